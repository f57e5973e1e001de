"""The challenge 2.0 band layout: names, pixel grids and where each band's FITS file lives.

A leaf (no I/O): ``lensray.simulate`` writes this layout, ``sky.fits`` reads it, ``ingest.preprocess``
resamples between its grids.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BandSpec:
    name: str
    size: int  # nominal stamp side in pixels
    pixel_scale: float  # arcsec per pixel


BANDS: dict[str, BandSpec] = {
    "VIS": BandSpec("VIS", 200, 0.1),
    "Y": BandSpec("Y", 66, 0.3),
    "J": BandSpec("J", 66, 0.3),
    "H": BandSpec("H", 66, 0.3),
}
BAND_NAMES: tuple[str, ...] = tuple(BANDS)
NIR_BANDS: tuple[str, ...] = ("Y", "J", "H")
VIS_SIZE: int = BANDS["VIS"].size
VIS_PIXEL_SCALE: float = BANDS["VIS"].pixel_scale
# NIR stamps a few pixels off the nominal 66 are real-data quirks; anything further off is a wrong file
# (e.g. a VIS stamp in an NIR folder) and is refused instead of being resampled into nonsense.
MAX_NIR_SIZE_DEVIATION = 6


def shape_problem(band: str, shape: tuple[int, ...]) -> str | None:
    """Why a 2-D stamp of ``shape`` cannot be ``band``'s (None if it can): a band on the VIS grid must be
    exactly its nominal size (it is cropped, never resampled), other bands at most a few pixels off."""
    spec = BANDS[band]
    if spec.pixel_scale == VIS_PIXEL_SCALE:
        expected = (spec.size, spec.size)
        return None if tuple(shape) == expected else f"expected {expected}"
    if any(abs(side - spec.size) > MAX_NIR_SIZE_DEVIATION for side in shape):
        return f"expected about {spec.size}x{spec.size} (at most {MAX_NIR_SIZE_DEVIATION} px off)"
    return None


def band_relpath(band: str, object_id: int) -> str:
    """``EUC_VIS/imageEUC_VIS-200001.fits``: the file of one ID's band under the data root."""
    return f"EUC_{band}/imageEUC_{band}-{int(object_id)}.fits"
