"""Observe a scene in any survey profile's bands (``lensray simulate --profile NAME``).

The scene is drawn and rendered exactly as for the challenge (unit maps on the 0.1"/px canvas, the four
Euclid bands' PSFs and noise draws): each profile band takes what it needs from those four *anchor* bands
at its own ``wavelength_nm``, so an object's random streams do not depend on the profile:

- colour: the share of a part's VIS - H colour the band carries, interpolated in wavelength between the
  anchors (VIS 0, Y 0.55, J 0.8, H 1.0); redder than H it stays 1.0; bluer than VIS it extrapolates the
  VIS-Y slope (red galaxies get fainter towards the blue, blue sources less so), floored at -0.6;
- PSF: the FWHM interpolated in wavelength between the object's anchor FWHMs (clamped outside
  VIS..H); the PSF's family and shape (Moffat beta, wings, ellipticity) are the nearest anchor's;
- depth: zero point, exposure time and the background noise per arcsec (sigma per pixel / pixel side:
  a surface-brightness depth) interpolated between the anchors (clamped), then put on the band's own
  pixels; the noise texture (level factor, correlation, sky residual) is the nearest anchor's.

Pixels: the PSF is applied on the canvas (0.1"), then the canvas is integrated over each band pixel,
centred on the canvas centre: every band pixel gets the flux of the canvas pixels it covers, each
weighted by the covered fraction of its area (exact for the piecewise-constant canvas, so flux is
conserved at any pixel scale; for an integer ratio, e.g. 0.2", these are plain block sums). Noise is drawn
on the band's own pixels, one stream per band position in the profile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
from scipy import ndimage, signal, sparse

from lensray.errors import ConfigError
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile
from lensray.simulate.instrument import (
    CANVAS_PIXEL,
    CANVAS_SIZE,
    COLOR_WEIGHT,
    BandNoise,
    BandObservation,
    Psf,
    band_observation,
)
from lensray.simulate.light import LightPart
from lensray.simulate.render import RenderedScene, _observed
from lensray.simulate.scene import Scene
from lensray.sky.bands import BAND_NAMES, BANDS

CHALLENGE = PROFILES[DEFAULT_PROFILE]
ANCHOR_WAVELENGTH = np.array([CHALLENGE.band(b).wavelength_nm for b in BAND_NAMES])  # VIS, Y, J, H (nm)
CANVAS_EXTENT = CANVAS_SIZE * CANVAS_PIXEL  # arcsec: the widest stamp a band can have
BLUE_COLOR_FLOOR = -0.6  # bluer than VIS: the colour weight's extrapolation stops here


def is_challenge(profile: SurveyProfile | None) -> bool:
    """The challenge layout (today's writer, catalogue and quirks) rather than a survey profile's."""
    return profile is None or profile == CHALLENGE


def color_weight(wavelength_nm: float) -> float:
    """How much of a part's VIS - H colour a band at ``wavelength_nm`` carries (module docstring)."""
    weights = np.array([COLOR_WEIGHT[b] for b in BAND_NAMES])
    if wavelength_nm >= ANCHOR_WAVELENGTH[0]:
        return float(np.interp(wavelength_nm, ANCHOR_WAVELENGTH, weights))
    slope = (weights[1] - weights[0]) / (ANCHOR_WAVELENGTH[1] - ANCHOR_WAVELENGTH[0])
    return max(BLUE_COLOR_FLOOR, float(weights[0] + slope * (wavelength_nm - ANCHOR_WAVELENGTH[0])))


def _interp(wavelength_nm: float, values: Sequence[float]) -> float:
    return float(np.interp(wavelength_nm, ANCHOR_WAVELENGTH, np.asarray(values, dtype=np.float64)))


@dataclass(frozen=True)
class SurveyBand:
    """One profile band as the simulator observes it."""

    name: str
    pixel_scale: float  # arcsec
    size: int  # stamp side (px)
    wavelength_nm: float
    color_weight: float
    observation: BandObservation  # depth on this band's pixels
    nearest: str  # the anchor band (VIS, Y, J, H) whose PSF shape and noise texture it takes

    def magnitude(self, part: LightPart) -> float:
        return part.mag_vis - self.color_weight * part.vis_minus_h

    def psf_fwhm(self, scene: Scene) -> float:
        return _interp(self.wavelength_nm, [scene.psf_fwhm[b] for b in BAND_NAMES])

    def psf(self, scene: Scene) -> Psf | None:
        """The scene's PSF at this band (randomised presets); None: classic's round Gaussian."""
        return None if scene.psf is None else replace(scene.psf[self.nearest], fwhm=self.psf_fwhm(scene))

    def noise(self, scene: Scene) -> BandNoise | None:
        return None if scene.noise is None else scene.noise[self.nearest]

    def sky_sigma(self, scene: Scene | None) -> float:
        """Background sigma per pixel (flux units) for this object."""
        noise = None if scene is None else self.noise(scene)
        scale = 1.0 if noise is None else noise.sky_scale
        return self.observation.noise_cps * scale * self.observation.flux_per_cps


@cache
def survey_bands(profile: SurveyProfile) -> tuple[SurveyBand, ...]:
    """The profile's bands with their colours and depths; a stamp wider than the canvas is a ConfigError."""
    anchors = [band_observation(b) for b in BAND_NAMES]
    per_arcsec = [obs.noise_cps / BANDS[b].pixel_scale for b, obs in zip(BAND_NAMES, anchors, strict=True)]
    bands = []
    for spec in profile.bands:
        extent = spec.size * spec.pixel_scale
        if extent > CANVAS_EXTENT + 1e-9:
            raise ConfigError(
                f'profile {profile.name}, band {spec.name}: stamps of {spec.size} px x {spec.pixel_scale}" = '
                f'{extent:.2f}" are wider than the simulator\'s {CANVAS_EXTENT:.1f}" canvas'
            )
        lam = spec.wavelength_nm
        observation = BandObservation(
            spec.name,
            _interp(lam, [a.zero_point for a in anchors]),
            _interp(lam, [a.exposure_time for a in anchors]),
            _interp(lam, per_arcsec) * spec.pixel_scale,
        )
        nearest = BAND_NAMES[int(np.argmin(np.abs(np.log(ANCHOR_WAVELENGTH / lam))))]
        bands.append(SurveyBand(spec.name, spec.pixel_scale, spec.size, lam, color_weight(lam), observation, nearest))
    return tuple(bands)


@cache
def overlap_matrix(size: int, pixel_scale: float) -> np.ndarray:
    """(size, CANVAS_SIZE): the fraction of each canvas pixel's width inside each band pixel, both grids
    centred on the canvas centre. ``W @ canvas @ W.T`` integrates the canvas over the band's pixels."""
    band_edges = (np.arange(size + 1) - size / 2) * pixel_scale
    canvas_edges = (np.arange(CANVAS_SIZE + 1) - CANVAS_SIZE / 2) * CANVAS_PIXEL
    low = np.maximum(band_edges[:-1, None], canvas_edges[None, :-1])
    high = np.minimum(band_edges[1:, None], canvas_edges[None, 1:])
    # Rounded so that aligned edges (integer ratios) give exact 0/1 weights: plain block sums.
    weights = np.round(np.clip(high - low, 0.0, None) / CANVAS_PIXEL, 12)
    weights.setflags(write=False)
    return weights


@cache
def _sparse_overlap(size: int, pixel_scale: float) -> sparse.csr_matrix:
    return sparse.csr_matrix(overlap_matrix(size, pixel_scale))


def resample(canvas: np.ndarray, size: int, pixel_scale: float) -> np.ndarray:
    """The canvas (flux per canvas pixel) integrated over a ``size`` x ``size`` grid of ``pixel_scale``."""
    # Sparse (a band pixel covers a few canvas pixels): single-threaded, where a dense BLAS product spins
    # up every core's thread for a 200 x 204 matrix and was 20x slower on a busy machine.
    weights = _sparse_overlap(size, pixel_scale)
    return np.asarray((weights @ (weights @ canvas).T).T)


def _convolved(canvas: np.ndarray, scene: Scene, band: SurveyBand) -> np.ndarray:
    """The band's PSF applied on the canvas (classic: a Gaussian filter; else the scene's kernel)."""
    psf = band.psf(scene)
    if psf is None:
        sigma = band.psf_fwhm(scene) / CANVAS_PIXEL / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        return ndimage.gaussian_filter(canvas, sigma, mode="constant")
    kernel = psf.kernel(CANVAS_PIXEL).astype(np.float32)
    return signal.fftconvolve(canvas.astype(np.float32), kernel, mode="same").astype(np.float64)


@dataclass(frozen=True)
class SurveyImages:
    images: dict[str, np.ndarray]  # band -> float32 image in flux units (noise-free when asked)
    variances: dict[str, np.ndarray]  # band -> float32 per-pixel noise variance (flux units^2)


def observe_survey(
    scene: Scene,
    rendered: RenderedScene,
    bands: Sequence[SurveyBand],
    rngs: Sequence[np.random.Generator],
    noisy: bool = True,
) -> SurveyImages:
    """Every band's image: colours, PSF on the canvas, integration onto the band's pixels, noise."""
    images: dict[str, np.ndarray] = {}
    variances: dict[str, np.ndarray] = {}
    for band, rng in zip(bands, rngs, strict=True):
        obs = band.observation
        canvas = np.zeros(rendered.maps[0].shape)
        for part, unit in zip(scene.parts, rendered.maps, strict=True):
            canvas += obs.cps(band.magnitude(part)) * unit
        model = resample(_convolved(canvas, scene, band), band.size, band.pixel_scale)
        noise = band.noise(scene)
        if noisy:
            images[band.name] = _observed(model, band.name, rng, noise, obs=obs)
        else:
            images[band.name] = (model * obs.flux_per_cps).astype(np.float32)
        sky = obs.noise_cps * (1.0 if noise is None else noise.sky_scale)
        exposure = obs.exposure_time * (1.0 if noise is None else noise.exposure_scale)
        variance = (sky**2 + np.maximum(model, 0.0) / exposure) * obs.flux_per_cps**2
        variances[band.name] = variance.astype(np.float32)
    return SurveyImages(images, variances)


def object_coordinates(seed: int, object_id: int) -> tuple[float, float]:
    """RA, Dec (deg, ICRS) of one ID: uniform on the sky in a 1 x 1 deg field around (150, 2) (COSMOS-like),
    from a stream of its own (it changes no other draw)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, int(object_id))))
    sin_low, sin_high = math.sin(math.radians(1.5)), math.sin(math.radians(2.5))
    dec = math.degrees(math.asin(rng.uniform(sin_low, sin_high)))
    ra = 150.0 + rng.uniform(-0.5, 0.5) / math.cos(math.radians(2.0))
    return ra, dec
