"""Survey profiles: which bands a survey's cutouts have, on which pixel grids, and where each band's image
lives (README "Your own survey").

A profile is part of the typed config (``data.profile``): the name of a shipped profile (``PROFILES``) or a
full mapping in a config file for any other survey. One band is the *reference*: its grid (pixel scale and
stamp side) is the network's grid, and every other band is resampled onto it at ingest (by WCS when both
headers carry one, else by the pixel-scale ratio, both grids centred on the object).

Where a band's image lives: ``path`` (or the band's own ``path``) is a template under ``data.images`` with
``{id}`` (the catalogue ID) and ``{band}`` (the band's name, or its ``file_name``); ``hdu`` is the HDU index
or EXTNAME that holds the image. Several bands naming one file (a multi-extension FITS per object) read
the file once. ``.fz`` (fpack, tile-compressed) and gzip files are read by astropy like any FITS file.
"""

from __future__ import annotations

import re
import string

from pydantic import BaseModel, ConfigDict, Field, model_validator

PLACEHOLDERS = frozenset({"id", "band"})


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BandProfile(_Frozen):
    """One band of a survey's cutouts."""

    name: str = Field(pattern=r"^[A-Za-z0-9_+-]+$")  # as in configs, stores and reports (VIS, g, ...)
    pixel_scale: float = Field(gt=0.0)  # arcsec per pixel of the band's own stamps
    size: int = Field(ge=4)  # nominal stamp side (px)
    # How far a stamp's side may be off `size` (px): 0 for the reference band (it is cropped, never
    # resampled); a few pixels for resampled bands whose cutouts vary by one or two (Euclid NIR 65-67).
    size_tolerance: int = Field(0, ge=0)
    wavelength_nm: float = Field(gt=0.0)  # effective wavelength: the simulator's colours, PSF and depth
    path: str | None = None  # this band's file template, when it differs from the profile's
    file_name: str | None = None  # what {band} becomes in the template (default: name)
    hdu: int | str = 0  # HDU index or EXTNAME holding the image (an .fz file's image is HDU 1)

    @property
    def token(self) -> str:
        return self.file_name if self.file_name is not None else self.name


class SurveyProfile(_Frozen):
    """A survey's cutout layout: its bands, the reference grid and the file template."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    bands: tuple[BandProfile, ...] = Field(min_length=1)
    reference: str  # the band whose grid the network sees
    path: str  # file template under data.images, with {id} and usually {band}

    @model_validator(mode="after")
    def _consistent(self) -> SurveyProfile:
        names = [band.name for band in self.bands]
        if len(set(names)) != len(names):
            raise ValueError(f"band repeated in {names}")
        if self.reference not in names:
            raise ValueError(f"reference band {self.reference!r} is not one of the bands {names}")
        if self.band(self.reference).size_tolerance:
            raise ValueError(
                f"the reference band {self.reference} cannot have a size_tolerance: it is cropped, not resampled"
            )
        for band in self.bands:
            _check_template(band.path or self.path, band.name)
        places = [(band.path or self.path, band.token, band.hdu) for band in self.bands]
        clash = [b.name for b, p in zip(self.bands, places, strict=True) if places.count(p) > 1]
        if clash:
            raise ValueError(f"bands {clash} would read the same image (same file and HDU)")
        return self

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(band.name for band in self.bands)

    def band(self, name: str) -> BandProfile:
        for band in self.bands:
            if band.name == name:
                return band
        raise KeyError(f"profile {self.name} has no band {name!r} (bands: {', '.join(self.band_names)})")

    @property
    def reference_band(self) -> BandProfile:
        return self.band(self.reference)

    def relpath(self, band: str, object_id: int) -> str:
        """Where ``band`` of ``object_id`` lives, relative to ``data.images``."""
        spec = self.band(band)
        return (spec.path or self.path).format(id=int(object_id), band=spec.token)


def _check_template(template: str, band: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise ValueError(
            f"path template {template!r} (band {band}) has unknown field(s) {sorted(unknown)}; use {{id}}, {{band}}"
        )
    if "id" not in fields:
        raise ValueError(f"path template {template!r} (band {band}) has no {{id}}: every object would read one file")
    if template.startswith("/") or re.search(r"(^|/)\.\.(/|$)", template):
        raise ValueError(f"path template {template!r} must stay under data.images (no leading / or ..)")


def _band(name: str, scale: float, size: int, wavelength: float, **more: object) -> BandProfile:
    return BandProfile(name=name, pixel_scale=scale, size=size, wavelength_nm=wavelength, **more)


# Effective wavelengths (nm): Euclid VIS and NISP Y/J/H; HSC and LSST filter pivots.
PROFILES: dict[str, SurveyProfile] = {
    # The Bologna Lens Finding Challenge 2.0: a file per band, image in HDU 0, NIR on its own 0.3" grid.
    "euclid_challenge": SurveyProfile(
        name="euclid_challenge",
        bands=(
            _band("VIS", 0.1, 200, 715.0),
            _band("Y", 0.3, 66, 1085.0, size_tolerance=6),
            _band("J", 0.3, 66, 1375.0, size_tolerance=6),
            _band("H", 0.3, 66, 1770.0, size_tolerance=6),
        ),
        reference="VIS",
        path="EUC_{band}/imageEUC_{band}-{id}.fits",
    ),
    # Euclid MER cutouts: every band on the VIS 0.1" grid, one multi-extension file per object.
    "euclid_mer": SurveyProfile(
        name="euclid_mer",
        bands=(
            _band("VIS", 0.1, 200, 715.0, hdu="VIS"),
            _band("Y", 0.1, 200, 1085.0, hdu="NIR_Y"),
            _band("J", 0.1, 200, 1375.0, hdu="NIR_J"),
            _band("H", 0.1, 200, 1770.0, hdu="NIR_H"),
        ),
        reference="VIS",
        path="{id}.fits",
    ),
    # HSC cutout service: a file per band, the image in the IMAGE extension (HDU 1; MASK and VARIANCE follow).
    "hsc": SurveyProfile(
        name="hsc",
        bands=tuple(
            _band(b, 0.168, 64, w, file_name=f"HSC-{b.upper()}", hdu="IMAGE")
            for b, w in (("g", 477.0), ("r", 613.0), ("i", 777.0), ("z", 891.0), ("y", 978.0))
        ),
        reference="i",
        path="{id}/{band}.fits",
    ),
    # LSST: fpack-compressed calexp-style cutouts, a file per band.
    "lsst": SurveyProfile(
        name="lsst",
        bands=tuple(
            _band(b, 0.2, 100, w, hdu=1)
            for b, w in (("u", 368.0), ("g", 478.0), ("r", 622.0), ("i", 755.0), ("z", 869.0), ("y", 971.0))
        ),
        reference="i",
        path="{band}/{id}.fits.fz",
    ),
}
DEFAULT_PROFILE = "euclid_challenge"


def recorded_profile(recorded: object | None) -> SurveyProfile:
    """The profile a store, run, export or score summary recorded (its dumped mapping); a record made before
    profiles existed, or of challenge cutouts, has none and means ``euclid_challenge``."""
    return PROFILES[DEFAULT_PROFILE] if recorded is None else SurveyProfile.model_validate(recorded)
