"""Render and observe a scene: one unit-flux map per light part on the canvas, then per band its
colours, the PSF (classic: Gaussian; randomised presets: the scene's ``Psf`` kernel), the band's pixel
grid and noise (classic: white at the nominal depth; randomised: the scene's ``BandNoise``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

from lensray.simulate.instrument import (
    CANVAS_PIXEL,
    CANVAS_SIZE,
    CANVAS_X,
    CANVAS_Y,
    NIR_BIN,
    VIS_MARGIN,
    WHOLE_CANVAS,
    BandNoise,
    BandObservation,
    Psf,
    band_observation,
    window,
)
from lensray.simulate.light import ClumpySource, Knots, PointSource, Ring
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
            lensed, lensed_magnification = _render_lensed(shape, scene.kwargs_lens)
            maps.append(lensed)
            magnification = magnification or lensed_magnification  # the first (main) source's
            continue
        if isinstance(shape, PointSource):
            maps.append(_render_point(shape.center))
            continue
        if isinstance(shape, Knots):
            unit = _render(shape.surface_brightness, window(shape.center, shape.extent), _bright(0.02))
        elif isinstance(shape, Ring):
            unit = _render(shape.surface_brightness, WHOLE_CANVAS, _bright(0.05))
        else:
            unit = _render(shape.surface_brightness, window(shape.center, part.window), _near(shape.center, part.core))
        maps.append(unit / unit.sum())
    return RenderedScene(tuple(maps), magnification)


def _render_point(center: tuple[float, float]) -> np.ndarray:
    """Unit flux shared bilinearly between the four canvas pixels around ``center``."""
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE))
    half = (CANVAS_SIZE - 1) / 2
    col, row = center[0] / CANVAS_PIXEL + half, center[1] / CANVAS_PIXEL + half
    c0, r0 = math.floor(col), math.floor(row)
    fc, fr = col - c0, row - r0
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        if 0 <= r0 + dr < CANVAS_SIZE and 0 <= c0 + dc < CANVAS_SIZE:
            canvas[r0 + dr, c0 + dc] += weight
    return canvas / max(canvas.sum(), 1e-12)


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


def _apply_psf(image: np.ndarray, scene: Scene, band: str, pixel_scale: float) -> np.ndarray:
    """The scene's PSF in ``band`` on pixels of ``pixel_scale``: classic's Gaussian filter, else its kernel."""
    if scene.psf is None:
        return _convolve(image, scene.psf_fwhm[band] / pixel_scale)
    psf: Psf = scene.psf[band]
    kernel = psf.kernel(pixel_scale).astype(np.float32)
    return signal.fftconvolve(image.astype(np.float32), kernel, mode="same").astype(np.float64)


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
    vis_groups = vis_group_maps(scene, rendered)
    vis_model = vis_groups["lens"] + vis_groups["companion"] + vis_groups["source"]
    images["VIS"] = _observed(vis_model, "VIS", rngs["VIS"], _band_noise(scene, "VIS"))
    binned: dict[int, list[np.ndarray]] = {}  # the parts on each NIR grid size in use, binned once
    everything = range(len(scene.parts))
    for band in NIR_BANDS:
        size = nir_sizes.get(band, BANDS[band].size)
        if size not in binned:
            binned[size] = [_nir_cut(unit, size) for unit in rendered.maps]
        # The PSF is applied on the NIR grid, as lenstronomy does without supersampled convolution.
        model = _apply_psf(_combine(scene, band, everything, binned[size]), scene, band, BANDS[band].pixel_scale)
        images[band] = _observed(model, band, rngs[band], _band_noise(scene, band))
    return images, vis_groups


def vis_group_maps(scene: Scene, rendered: RenderedScene) -> dict[str, np.ndarray]:
    """The noiseless VIS stamp (e-/s) of each light group (lens, companion, source): what ``measure`` reads."""
    vis_groups: dict[str, np.ndarray] = {}
    groups = ("lens", "companion", "source")
    members = {g: [k for k, part in enumerate(scene.parts) if part.group == g] for g in groups}
    canvases = {g: _combine(scene, "VIS", members[g], rendered.maps) for g in groups}
    if scene.psf is None:
        for g in groups:
            canvases[g] = _convolve(canvases[g], scene.psf_fwhm["VIS"] / CANVAS_PIXEL) if members[g] else canvases[g]
    else:  # one batched FFT convolution for the groups that have light: the kernel is transformed once
        lit = [g for g in groups if members[g]]
        # float32 FFTs: twice as fast, and 1e-7 relative error is far below the noise.
        kernel = scene.psf["VIS"].kernel(CANVAS_PIXEL).astype(np.float32)[None]
        stack = np.stack([canvases[g] for g in lit]).astype(np.float32)
        convolved = signal.fftconvolve(stack, kernel, mode="same", axes=(1, 2)).astype(np.float64)
        canvases.update(zip(lit, convolved, strict=True))
    for g in groups:
        vis_groups[g] = _vis_cut(canvases[g])
    return vis_groups


def _combine(scene: Scene, band: str, members: Sequence[int], maps: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of unit maps scaled to each part's flux in ``band`` (e-/s)."""
    obs = band_observation(band)
    total = np.zeros(maps[0].shape)
    for k in members:
        total += obs.cps(scene.parts[k].magnitude(band)) * maps[k]
    return total


def _band_noise(scene: Scene, band: str) -> BandNoise | None:
    return None if scene.noise is None else scene.noise[band]


def _observed(
    model_cps: np.ndarray,
    band: str,
    rng: np.random.Generator,
    noise: BandNoise | None,
    obs: BandObservation | None = None,
) -> np.ndarray:
    """Add noise and convert to flux units. Sky photons (hundreds per pixel per co-add) and read noise
    dominate, so Poisson noise is drawn in its Gaussian limit, with lenstronomy's per-pixel variance
    (SingleBand.estimate_noise: background variance + model counts / exposure time). ``noise`` (the
    randomised presets) scales both terms, correlates the field (variance kept) and adds a sky residual.
    ``obs``: the band's depth when it is not one of the challenge's bands (a survey profile's band)."""
    obs = obs if obs is not None else band_observation(band)
    if noise is None:
        sigma = np.sqrt(obs.noise_cps**2 + np.maximum(model_cps, 0.0) / obs.exposure_time)
        return ((model_cps + sigma * rng.standard_normal(model_cps.shape)) * obs.flux_per_cps).astype(np.float32)
    background = obs.noise_cps * noise.sky_scale
    sigma = np.sqrt(background**2 + np.maximum(model_cps, 0.0) / (obs.exposure_time * noise.exposure_scale))
    field = rng.standard_normal(model_cps.shape)
    if noise.correlation > 0:
        # Smoothed white noise has variance sum(kernel^2): divide it out so the level stays sigma.
        delta = np.zeros((33, 33))
        delta[16, 16] = 1.0
        norm = math.sqrt(float((ndimage.gaussian_filter(delta, noise.correlation) ** 2).sum()))
        field = ndimage.gaussian_filter(field, noise.correlation, mode="wrap") / norm
    size = model_cps.shape[0]
    axis = np.linspace(-0.5, 0.5, size)
    pedestal, slope_x, slope_y = noise.gradient
    residual = background * (pedestal + slope_x * axis[None, :] + slope_y * axis[:, None])
    return ((model_cps + sigma * field + residual) * obs.flux_per_cps).astype(np.float32)
