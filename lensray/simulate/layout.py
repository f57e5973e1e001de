"""A survey profile's files for one object, as the survey delivers them (``lensray simulate --profile``).

Each band goes to ``profile.relpath(band, id)`` at ``profile.band(band).hdu``:

- HDU 0: the image is the primary HDU (one band per file, as the challenge);
- an EXTNAME or an index > 0: an empty primary HDU, then the image extensions; bands naming one file share
  it (euclid_mer: VIS, NIR_Y, NIR_J, NIR_H in one ``{id}.fits``), in HDU-index order, named ones after;
- a file holding a single band that is not the primary also gets ``MASK`` (int32; bit 8, NO_DATA, on NaN
  pixels) and ``VARIANCE`` (float32, flux^2) extensions after the image, as the HSC cutout service and LSST
  calexps write them;
- ``.fz`` paths: every extension tile-compressed (``fits.CompImageHDU``: RICE_1, float images quantised
  with subtractive dithering as fpack does, one tile per image and a dither seed fixed per ID so the bytes
  are reproducible);
  ``.gz`` paths: the whole file gzipped.

Every image HDU carries a celestial TAN WCS (CRVAL = the object's RA/Dec, CRPIX at the stamp centre,
CDELT = the pixel scale, RA increasing to the left; RADESYS ICRS, EQUINOX 2000), BUNIT, PIXSCALE, BAND,
FILTER, MAGZP and the observing facts.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from lensray.errors import ConfigError
from lensray.profiles import SurveyProfile
from lensray.simulate.instrument import FLUX_MAGZP
from lensray.simulate.scene import Scene
from lensray.simulate.survey import SurveyBand

NO_DATA_BIT = 8  # HSC's mask plane for pixels without data


def wcs_header(ra: float, dec: float, size: int, pixel_scale: float) -> fits.Header:
    """A celestial TAN WCS with the object at the stamp centre."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]  # FITS pixels are 1-based: the centre of the stamp
    wcs.wcs.cdelt = [-pixel_scale / 3600.0, pixel_scale / 3600.0]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    header = wcs.to_header()
    header["EQUINOX"] = (2000.0, "equinox of the celestial coordinates")
    return header


def band_header(
    band: SurveyBand, object_id: int, ra: float, dec: float, scene: Scene | None, seed: int, size: int
) -> fits.Header:
    header = wcs_header(ra, dec, size, band.pixel_scale)
    header["BAND"] = (band.name, "band (lensray survey profile)")
    header["FILTER"] = (band.name, "filter")
    header["WAVELEN"] = (band.wavelength_nm, "effective wavelength (nm)")
    header["ID"] = (int(object_id), "object identifier")
    header["PIXSCALE"] = (band.pixel_scale, "arcsec per pixel")
    header["BUNIT"] = ("flux", "AB mag = -2.5 log10(flux) + MAGZP")
    header["MAGZP"] = (FLUX_MAGZP, "AB magnitude of unit flux")
    if scene is not None:
        header["PSF_FWHM"] = (round(band.psf_fwhm(scene), 4), "PSF FWHM (arcsec)")
        psf = band.psf(scene)
        header["PSFKIND"] = (psf.kind if psf is not None else "gaussian", "PSF family (lensray simulate)")
    header["SKYSIG"] = (float(f"{band.sky_sigma(scene):.4e}"), "background noise sigma per pixel (flux)")
    header["EXPTIME"] = (round(band.observation.exposure_time, 1), "total exposure time (s)")
    header["ORIGIN"] = ("lensray.simulate", "lenstronomy-based survey-profile simulation")
    header["SIMSEED"] = (int(seed), "simulation seed")
    return header


def _image_hdu(data: np.ndarray, header: fits.Header, name: str | None, compressed: bool, seed: int) -> fits.ImageHDU:
    if compressed:
        # One tile per image: a constant tile (a row of a sky-only VARIANCE plane) cannot be quantised and
        # is gzipped with the clock in its header instead; a whole stamp never is constant, so bytes repeat.
        hdu = fits.CompImageHDU(
            data=data, header=header, compression_type="RICE_1", dither_seed=seed, tile_shape=data.shape
        )
    else:
        hdu = fits.ImageHDU(data=data, header=header)
    if name is not None:
        hdu.name = name
    return hdu


def file_layout(profile: SurveyProfile) -> dict[str, list[str]]:
    """Each file (as ID 0's path) -> its bands in HDU order (indices first, then names); refuses layouts it
    cannot write."""
    files: dict[str, list[str]] = {}
    for spec in profile.bands:  # keyed by one ID's file: bands with the same file share it
        files.setdefault(profile.relpath(spec.name, 0), []).append(spec.name)
    for template, names in files.items():
        hdus = [profile.band(n).hdu for n in names]
        if 0 in hdus and (len(names) > 1 or template.endswith(".fz")):
            raise ConfigError(
                f"profile {profile.name}: {template} cannot hold band {names[hdus.index(0)]} in HDU 0 "
                + ("(a compressed image is never the primary HDU)" if template.endswith(".fz") else "and others")
            )
        indices = sorted(h for h in hdus if isinstance(h, int))
        if indices and indices != list(range(indices[0], indices[0] + len(indices))):
            raise ConfigError(f"profile {profile.name}: {template} has HDU indices {indices} with gaps")
        names.sort(key=lambda n: (0, h) if isinstance(h := profile.band(n).hdu, int) else (1, 0))
    return files


def object_files(
    profile: SurveyProfile,
    bands: Sequence[SurveyBand],
    object_id: int,
    images: dict[str, np.ndarray],
    variances: dict[str, np.ndarray],
    coords: tuple[float, float],
    scene: Scene | None,
    seed: int,
) -> dict[str, bytes]:
    """Relative path -> file bytes for every file of one object."""
    # C order: astropy writes a non-C-contiguous array (resampled stamps come out Fortran-ordered) one pixel
    # at a time; the bytes are the same either way.
    images = {name: np.ascontiguousarray(image) for name, image in images.items()}
    variances = {name: np.ascontiguousarray(variance) for name, variance in variances.items()}
    by_name = {band.name: band for band in bands}
    dither = 1 + int(object_id) % 10000  # astropy's dither seeds run 1..10000; 0 would read the clock
    out: dict[str, bytes] = {}
    for names in file_layout(profile).values():
        relpath = profile.relpath(names[0], object_id)
        compressed = relpath.endswith(".fz") or relpath.endswith(".fz.gz")
        headers = {n: band_header(by_name[n], object_id, *coords, scene, seed, images[n].shape[0]) for n in names}
        primary_band = names[0] if profile.band(names[0]).hdu == 0 else None
        primary = fits.PrimaryHDU(data=images[primary_band] if primary_band else None, header=headers.get(primary_band))
        primary.header["ID"] = (int(object_id), "object identifier")
        hdul = fits.HDUList([primary])
        first_index = profile.band(names[0]).hdu
        for _ in range(1, first_index if isinstance(first_index, int) and first_index > 1 else 1):
            hdul.append(fits.ImageHDU())  # the profile's image sits further down: empty HDUs before it
        for name in names:
            if name == primary_band:
                continue
            hdu = profile.band(name).hdu
            extname = hdu if isinstance(hdu, str) else ("IMAGE" if len(names) == 1 else name)
            hdul.append(_image_hdu(images[name], headers[name], extname, compressed, dither))
        if len(names) == 1 and primary_band is None:  # a single-band cutout: its mask and variance follow
            mask = np.where(np.isnan(images[names[0]]), np.int32(1 << NO_DATA_BIT), np.int32(0)).astype(np.int32)
            mask_header = wcs_header(*coords, mask.shape[0], by_name[names[0]].pixel_scale)
            mask_header["HIERARCH MP_NO_DATA"] = (NO_DATA_BIT, "mask plane: pixel has no data")
            hdul.append(_image_hdu(mask, mask_header, "MASK", compressed, dither))
            variance_header = wcs_header(*coords, mask.shape[0], by_name[names[0]].pixel_scale)
            variance_header["BUNIT"] = ("flux2", "variance of the image pixels")
            hdul.append(_image_hdu(variances[names[0]], variance_header, "VARIANCE", compressed, dither))
        buffer = io.BytesIO()
        hdul.writeto(buffer, output_verify="exception")
        data = buffer.getvalue()
        out[relpath] = gzip.compress(data, mtime=0) if relpath.endswith(".gz") else data
    return out
