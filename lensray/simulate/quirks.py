"""The real data's image quirks, injected at small rates: NaN pixels and off-size NIR stamps.

The data set's other quirks (catalogue rows without images, duplicate ID rows) are planned for the
whole set by ``writer.plan_dataset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lensray.config import SimulateConfig
from lensray.sky.bands import BAND_NAMES, NIR_BANDS


@dataclass(frozen=True)
class ImageQuirks:
    nir_sizes: dict[str, int] = field(default_factory=dict)  # off-size NIR stamps: band -> side
    nan_pixels: dict[str, int] = field(default_factory=dict)  # band -> NaN pixels injected


def draw_nir_sizes(rng: np.random.Generator, config: SimulateConfig) -> dict[str, int]:
    """Which NIR band (if any) gets an off-by-one stamp, and its side."""
    if rng.random() >= config.offsize_nir_rate:
        return {}
    return {str(rng.choice(NIR_BANDS)): int(rng.choice([65, 67]))}


def inject_nan_pixels(
    images: dict[str, np.ndarray], rng: np.random.Generator, config: SimulateConfig
) -> dict[str, int]:
    """Blank some pixels in one or two bands, as a few real cutouts have: scattered bad pixels, a small
    block, or a strip along an edge where the cutout left the survey footprint."""
    if rng.random() >= config.nan_pixel_rate:
        return {}
    counts: dict[str, int] = {}
    for band in rng.choice(BAND_NAMES, size=int(rng.integers(1, 3)), replace=False):
        image = images[str(band)]
        rows, cols = image.shape
        pattern = rng.choice(["scattered", "block", "edge"])
        if pattern == "scattered":
            k = int(rng.integers(1, 21))
            image[rng.integers(0, rows, k), rng.integers(0, cols, k)] = np.nan
        elif pattern == "block":
            h, w = (int(v) for v in rng.integers(2, 7, size=2))
            r0, c0 = int(rng.integers(0, rows - h)), int(rng.integers(0, cols - w))
            image[r0 : r0 + h, c0 : c0 + w] = np.nan
        else:
            width = int(rng.integers(1, 4))
            edges = (np.s_[:width, :], np.s_[-width:, :], np.s_[:, :width], np.s_[:, -width:])
            image[edges[int(rng.integers(0, len(edges)))]] = np.nan
        counts[str(band)] = int(np.isnan(image).sum())
    return counts
