"""Render and observe a scene: one unit-flux map per light part on the canvas, then per band its
colours, the Gaussian PSF, the band's pixel grid and noise."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lensray.simulate.instrument import (
    CANVAS_PIXEL,
    CANVAS_SIZE,
    CANVAS_X,
    CANVAS_Y,
    NIR_BIN,
    VIS_MARGIN,
    WHOLE_CANVAS,
    band_observation,
    window,
)
from lensray.simulate.light import ClumpySource, Knots, Ring
from lensray.simulate.scene import Scene, lens_model
from lensray.sky.bands import BANDS, NIR_BANDS

# ---------------------------------------------------------------------------------------------------
# Render: one unit-flux map per light part on the canvas


def _render(
    surface_brightness: Callable[[np.ndarray, np.ndarray], np.ndarray],
    region: tuple[slice, slice],
    supersample: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    factor: int = 4,
) -> np.ndarray:
    """Pixel-averaged surface brightness on the canvas: pixel centres everywhere, factor x factor
    sub-pixels only where ``supersample(x, y, first_pass)`` says the light varies fast (lenstronomy's
    adaptive supersampling idea, at a fraction of the cost of supersampling the whole canvas)."""
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE))
    x, y = CANVAS_X[region], CANVAS_Y[region]
    if x.size == 0:
        return canvas
    values = surface_brightness(x.ravel(), y.ravel()).reshape(x.shape)
    mask = supersample(x, y, values)
    if mask.any():
        offsets = ((np.arange(factor) + 0.5) / factor - 0.5) * CANVAS_PIXEL
        dx, dy = (a.ravel() for a in np.meshgrid(offsets, offsets))
        sub_x = (x[mask][:, None] + dx[None, :]).ravel()
        sub_y = (y[mask][:, None] + dy[None, :]).ravel()
        values[mask] = surface_brightness(sub_x, sub_y).reshape(-1, factor * factor).mean(axis=1)
    canvas[region] = values
    return canvas


def _near(center: tuple[float, float], radius: float):
    return lambda x, y, values: np.hypot(x - center[0], y - center[1]) < radius


def _bright(fraction: float):
    """Where the first pass is above ``fraction`` of its peak, grown by one pixel (thin arcs, small knots)."""

    def mask(x, y, values):
        peak = values.max()
        return ndimage.binary_dilation(values > fraction * peak) if peak > 0 else np.zeros(values.shape, bool)

    return mask


@dataclass(frozen=True)
class RenderedScene:
    """Unit maps: each light part's canvas map normalised to unit flux (the lensed source: to its
    magnification, i.e. lensed flux / unlensed flux)."""

    maps: tuple[np.ndarray, ...]
    magnification: float  # mag_eff; 0 without a source


def render_scene(scene: Scene) -> RenderedScene:
    """Every light part's unit map, in ``scene.parts`` order, and the source's magnification."""
    maps: list[np.ndarray] = []
    magnification = 0.0
    for part in scene.parts:
        shape = part.shape
        if isinstance(shape, ClumpySource):
            lensed, magnification = _render_lensed(shape, scene.kwargs_lens)
            maps.append(lensed)
            continue
        if isinstance(shape, Knots):
            unit = _render(shape.surface_brightness, window(shape.center, shape.extent), _bright(0.02))
        elif isinstance(shape, Ring):
            unit = _render(shape.surface_brightness, WHOLE_CANVAS, _bright(0.05))
        else:
            unit = _render(shape.surface_brightness, window(shape.center, part.window), _near(shape.center, part.core))
        maps.append(unit / unit.sum())
    return RenderedScene(tuple(maps), magnification)


def _render_lensed(source: ClumpySource, kwargs_lens: Sequence[dict[str, float]]) -> tuple[np.ndarray, float]:
    """The lensed source's map in units of its unlensed flux, and so its magnification: rendered with
    and without the lens."""
    unlensed = _render(source.surface_brightness, window(source.center, source.extent), _bright(1e-3))
    model, kwargs = lens_model(), list(kwargs_lens)

    def lensed_sb(x, y):
        return source.surface_brightness(*model.ray_shooting(x, y, kwargs))

    lensed = _render(lensed_sb, WHOLE_CANVAS, _bright(1e-3))
    total = unlensed.sum()
    return lensed / total, float(lensed.sum() / total)


# ---------------------------------------------------------------------------------------------------
# Observe: colours, PSF, band grids, noise


def _convolve(image: np.ndarray, fwhm_pixels: float) -> np.ndarray:
    """A Gaussian PSF given by its FWHM in pixels of ``image``."""
    return ndimage.gaussian_filter(image, fwhm_pixels / (2.0 * math.sqrt(2.0 * math.log(2.0))), mode="constant")


def _vis_cut(canvas: np.ndarray) -> np.ndarray:
    return canvas[VIS_MARGIN : VIS_MARGIN + BANDS["VIS"].size, VIS_MARGIN : VIS_MARGIN + BANDS["VIS"].size]


def _nir_cut(canvas: np.ndarray, size: int) -> np.ndarray:
    """Sum 3x3 canvas blocks into NIR pixels; an off-size stamp is cut around the same centre, off by
    half a canvas pixel like a rounding cutout tool."""
    span = NIR_BIN * size
    if span > CANVAS_SIZE:
        raise ValueError(f"NIR stamp of {size} px needs {span} canvas px, the canvas has {CANVAS_SIZE}")
    start = (CANVAS_SIZE - span) // 2
    block = canvas[start : start + span, start : start + span]
    return block.reshape(size, NIR_BIN, size, NIR_BIN).sum(axis=(1, 3))


def observe(
    scene: Scene, rendered: RenderedScene, rngs: dict[str, np.random.Generator], nir_sizes: dict[str, int]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Noisy images in flux units (float32) per band, and the noiseless VIS maps (e-/s) per group."""
    images: dict[str, np.ndarray] = {}
    vis_groups: dict[str, np.ndarray] = {}
    for group in ("lens", "companion", "source"):
        members = [k for k, part in enumerate(scene.parts) if part.group == group]
        canvas = _combine(scene, "VIS", members, rendered.maps)
        if members:
            canvas = _convolve(canvas, scene.psf_fwhm["VIS"] / CANVAS_PIXEL)
        vis_groups[group] = _vis_cut(canvas)
    images["VIS"] = _observed(vis_groups["lens"] + vis_groups["companion"] + vis_groups["source"], "VIS", rngs["VIS"])
    binned: dict[int, list[np.ndarray]] = {}  # the parts on each NIR grid size in use, binned once
    everything = range(len(scene.parts))
    for band in NIR_BANDS:
        size = nir_sizes.get(band, BANDS[band].size)
        if size not in binned:
            binned[size] = [_nir_cut(unit, size) for unit in rendered.maps]
        # The PSF is applied on the NIR grid, as lenstronomy does without supersampled convolution.
        fwhm_pixels = scene.psf_fwhm[band] / BANDS[band].pixel_scale
        model = _convolve(_combine(scene, band, everything, binned[size]), fwhm_pixels)
        images[band] = _observed(model, band, rngs[band])
    return images, vis_groups


def _combine(scene: Scene, band: str, members: Sequence[int], maps: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of unit maps scaled to each part's flux in ``band`` (e-/s)."""
    obs = band_observation(band)
    total = np.zeros(maps[0].shape)
    for k in members:
        total += obs.cps(scene.parts[k].magnitude(band)) * maps[k]
    return total


def _observed(model_cps: np.ndarray, band: str, rng: np.random.Generator) -> np.ndarray:
    """Add noise and convert to flux units. Sky photons (hundreds per pixel per co-add) and read noise
    dominate, so Poisson noise is drawn in its Gaussian limit, with lenstronomy's per-pixel variance
    (SingleBand.estimate_noise: background variance + model counts / exposure time)."""
    obs = band_observation(band)
    sigma = np.sqrt(obs.noise_cps**2 + np.maximum(model_cps, 0.0) / obs.exposure_time)
    return ((model_cps + sigma * rng.standard_normal(model_cps.shape)) * obs.flux_per_cps).astype(np.float32)
