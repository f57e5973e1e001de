"""Band geometry helpers: the challenge layout's names (kept for the simulator and old callers) and the
stamp-size rule every profile's bands follow.

A leaf (no I/O). The survey layouts themselves are ``lensray.profiles`` (``data.profile``); the constants
here are the ``euclid_challenge`` profile's, derived from it so that the two can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from lensray.profiles import DEFAULT_PROFILE, PROFILES, BandProfile

CHALLENGE = PROFILES[DEFAULT_PROFILE]


@dataclass(frozen=True)
class BandSpec:
    name: str
    size: int  # nominal stamp side in pixels
    pixel_scale: float  # arcsec per pixel


BANDS: dict[str, BandSpec] = {b.name: BandSpec(b.name, b.size, b.pixel_scale) for b in CHALLENGE.bands}
BAND_NAMES: tuple[str, ...] = CHALLENGE.band_names
NIR_BANDS: tuple[str, ...] = tuple(b for b in BAND_NAMES if b != CHALLENGE.reference)
VIS_SIZE: int = CHALLENGE.reference_band.size
VIS_PIXEL_SCALE: float = CHALLENGE.reference_band.pixel_scale
# NIR stamps a few pixels off the nominal 66 are real-data quirks; anything further off is a wrong file
# (e.g. a VIS stamp in an NIR folder) and is refused instead of being resampled into nonsense.
MAX_NIR_SIZE_DEVIATION = CHALLENGE.band("Y").size_tolerance


def stamp_problem(spec: BandProfile, shape: tuple[int, ...]) -> str | None:
    """Why a 2-D stamp of ``shape`` cannot be band ``spec``'s (None if it can): a band without a
    ``size_tolerance`` (the reference, bands cropped like it) must be exactly its nominal size; other bands
    at most ``size_tolerance`` pixels off on each side."""
    if not spec.size_tolerance:
        expected = (spec.size, spec.size)
        return None if tuple(shape) == expected else f"expected {expected}"
    if any(abs(side - spec.size) > spec.size_tolerance for side in shape):
        return f"expected about {spec.size}x{spec.size} (at most {spec.size_tolerance} px off)"
    return None


def shape_problem(band: str, shape: tuple[int, ...]) -> str | None:
    """``stamp_problem`` for a band of the challenge layout."""
    return stamp_problem(CHALLENGE.band(band), shape)


def band_relpath(band: str, object_id: int) -> str:
    """``EUC_VIS/imageEUC_VIS-200001.fits``: the file of one ID's band under the data root (challenge layout)."""
    return CHALLENGE.relpath(band, object_id)
