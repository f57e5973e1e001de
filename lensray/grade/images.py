"""A candidate's pictures for the grading page: every band in grey and a colour composite, as PNG bytes.

Pixels come from the raw cutouts through ``sky.fits.read_cutout`` (the reader ingest and score use).
Each band is put on its own noise scale first (median subtracted, divided by the robust sigma of the
stamp, astropy's ``mad_std``), so raw fluxes of 1e-12 and 1e+3 look alike. Grey: an arcsinh stretch
between the 0.5 and 99.8 percentiles. Colour: astropy's ``make_lupton_rgb`` on the reddest, middle and
bluest bands (the profile's order is blue to red: VIS, Y, J, H -> R = H, G = Y, B = VIS), each resampled
to the largest stamp's grid by bilinear ``scipy.ndimage.zoom``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from lensray.profiles import SurveyProfile
from lensray.sky.fits import Cutout, read_cutout

COMPOSITE = "rgb"  # the image name of the colour composite beside the band names
LUPTON_STRETCH, LUPTON_Q = 8.0, 6.0  # in noise sigmas: faint arcs a few sigma above the sky stay visible


def normalised(image: np.ndarray) -> np.ndarray:
    """``(image - median) / robust sigma``: the band on its own noise scale."""
    from astropy.stats import mad_std

    finite = image[np.isfinite(image)]
    sigma = float(mad_std(finite)) if finite.size else 0.0
    if not np.isfinite(sigma) or sigma <= 0:
        sigma = float(np.std(finite)) or 1.0
    return np.nan_to_num((image - np.median(finite)) / sigma)


def grey_png(image: np.ndarray) -> bytes:
    """One band as a grey PNG (arcsinh stretch of the noise-scaled band between two percentiles)."""
    scaled = np.arcsinh(normalised(image))
    low, high = np.percentile(scaled, [0.5, 99.8])
    grey = np.clip((scaled - low) / max(high - low, 1e-9), 0, 1)
    return _png(grey, cmap="gray")


def composite_png(bands: Sequence[np.ndarray]) -> bytes:
    """Three or more bands (blue to red) as a Lupton colour composite PNG."""
    from astropy.visualization import make_lupton_rgb
    from scipy.ndimage import zoom

    blue, green, red = bands[0], bands[len(bands) // 2], bands[-1]
    shape = max((b.shape for b in (blue, green, red)), key=lambda s: s[0] * s[1])
    grid = [
        normalised(zoom(b, (shape[0] / b.shape[0], shape[1] / b.shape[1]), order=1) if b.shape != shape else b)
        for b in (red, green, blue)
    ]
    rgb = make_lupton_rgb(*grid, minimum=-1.0, stretch=LUPTON_STRETCH, Q=LUPTON_Q)
    return _png(rgb)


def _png(array: np.ndarray, cmap: str | None = None) -> bytes:
    import matplotlib.image

    sink = io.BytesIO()
    matplotlib.image.imsave(sink, array, cmap=cmap, format="png", origin="lower")  # FITS: row 0 at the bottom
    return sink.getvalue()


def candidate_pngs(
    images_url: str, object_id: int, bands: Sequence[str], profile: SurveyProfile | None = None
) -> dict[str, bytes]:
    """``{band: PNG, "rgb": PNG}`` of one candidate, read in the survey ``profile``'s layout (default: the
    challenge's; the composite with three bands or more). A bad or missing cutout raises
    ``sky.fits.CutoutError`` naming the ID, band and URL."""
    cutout: Cutout = read_cutout(images_url, object_id, bands, "zero", profile=profile)
    pngs = {band: grey_png(cutout.bands[band]) for band in bands}
    if len(bands) >= 3:
        pngs[COMPOSITE] = composite_png([cutout.bands[band] for band in bands])
    return pngs
