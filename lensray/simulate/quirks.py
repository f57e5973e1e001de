"""The real data's image quirks, injected at small rates: NaN pixels and off-size NIR stamps.

The data set's other quirks (catalogue rows without images, duplicate ID rows) are planned for the
whole set by ``writer.plan_dataset``.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    images: dict[str, np.ndarray],
    rng: np.random.Generator,
    config: SimulateConfig,
    bands: Sequence[str] = BAND_NAMES,
) -> dict[str, int]:
    """Blank some pixels in one or two of ``bands``, as a few real cutouts have: scattered bad pixels, a
    small block, or a strip along an edge where the cutout left the survey footprint."""
    if rng.random() >= config.nan_pixel_rate:
        return {}
    counts: dict[str, int] = {}
    for band in rng.choice(bands, size=min(len(bands), int(rng.integers(1, 3))), replace=False):
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


def inject_artefacts(
    images: dict[str, np.ndarray],
    kinds: tuple[str, ...],
    sigmas: dict[str, float],
    rng: np.random.Generator,
    bands: Sequence[str] = BAND_NAMES,
    sharpest: str = "VIS",
) -> None:
    """Detector and sky artefacts (the randomised presets), in place, scaled by each band's background
    ``sigmas`` (flux units): a cosmic-ray track (mostly in the ``sharpest`` band: VIS), a satellite trail
    across one band, a bad column (or row) offset in one band."""
    for kind in kinds:
        band = sharpest if kind == "cosmic_ray" and rng.random() < 0.8 else str(rng.choice(bands))
        image = images[band]
        size = image.shape[0]
        sigma = sigmas[band]
        if kind == "cosmic_ray":
            length, angle = rng.uniform(1.0, 8.0), rng.uniform(0.0, np.pi)
            r0, c0 = rng.uniform(0, size - 1, size=2)
            steps = np.linspace(0.0, length, max(2, int(2 * length)))
            rows = np.clip(np.round(r0 + steps * np.sin(angle)).astype(int), 0, size - 1)
            cols = np.clip(np.round(c0 + steps * np.cos(angle)).astype(int), 0, size - 1)
            image[rows, cols] += np.float32(rng.uniform(10.0, 300.0) * sigma)
        elif kind == "satellite":
            rows, cols = np.indices(image.shape)
            angle, r0, c0 = rng.uniform(0.0, np.pi), rng.uniform(0, size), rng.uniform(0, size)
            distance = np.abs((rows - r0) * np.cos(angle) - (cols - c0) * np.sin(angle))
            width, amplitude = rng.uniform(0.5, 1.5), rng.uniform(2.0, 30.0)
            image += (amplitude * sigma * np.exp(-0.5 * (distance / width) ** 2)).astype(np.float32)
        else:
            index, start = int(rng.integers(0, size)), int(rng.integers(0, size // 2)) if rng.random() < 0.5 else 0
            offset = np.float32(rng.choice([-1.0, 1.0]) * rng.uniform(3.0, 20.0) * sigma)
            if rng.random() < 0.7:
                image[start:, index] += offset
            else:
                image[index, start:] += offset
