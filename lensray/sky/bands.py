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


def band_relpath(band: str, object_id: int) -> str:
    """``EUC_VIS/imageEUC_VIS-200001.fits``: the file of one ID's band under the data root."""
    return f"EUC_{band}/imageEUC_{band}-{int(object_id)}.fits"
