"""Instrument, units and the render canvas shared by every stage of the simulator.

Image flux units, the cosmology, each band's Euclid depth (lenstronomy's Euclid configuration on the
challenge's pixel grids), the colours and PSFs the bands get, and the canvas on which every light
component is rendered once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from astropy.cosmology import FlatLambdaCDM
from lenstronomy.SimulationAPI.observation_api import SingleBand
from lenstronomy.SimulationAPI.ObservationConfig.Euclid import Euclid

from lensray.sky.bands import BANDS

# AB magnitude of unit image flux: m = -2.5 log10(F) + FLUX_MAGZP puts pixels at ~1e-13 (noise) to
# ~1e-9 (galaxy cores), the raw scale of the challenge's cutouts.
FLUX_MAGZP = -1.0
COSMOLOGY = FlatLambdaCDM(H0=70.0, Om0=0.3)

# Every component is rendered once at the VIS pixel scale on a canvas 2 px wider than the VIS stamp on
# each side; NIR pixels (0.3") are exact 3x3 blocks of it, and the margin lets an off-size NIR stamp
# (67 px = 201 canvas px) be cut like the real off-by-one cutouts.
CANVAS_PIXEL = 0.1
CANVAS_SIZE = 204
VIS_MARGIN = (CANVAS_SIZE - BANDS["VIS"].size) // 2
NIR_BIN = 3
_AXIS = (np.arange(CANVAS_SIZE) - (CANVAS_SIZE - 1) / 2) * CANVAS_PIXEL
CANVAS_Y, CANVAS_X = np.meshgrid(_AXIS, _AXIS, indexing="ij")  # row = y, column = x (arcsec)
WHOLE_CANVAS = (slice(None), slice(None))

# How much of a colour (VIS - H, AB) each band carries: a smooth SED between VIS and H.
COLOR_WEIGHT = {"VIS": 0.0, "Y": 0.55, "J": 0.8, "H": 1.0}
# Gaussian PSF FWHM ranges (arcsec), drawn per object and band.
PSF_FWHM_RANGE = {"VIS": (0.16, 0.20), "Y": (0.30, 0.45), "J": (0.32, 0.47), "H": (0.35, 0.50)}


@dataclass(frozen=True)
class BandObservation:
    """One band's Euclid Wide-survey depth (lenstronomy's Euclid config) on this band's pixel grid."""

    band: str
    zero_point: float  # AB magnitude of 1 e-/s
    exposure_time: float  # total over the co-added exposures (s)
    noise_cps: float  # background sigma per pixel (e-/s): sky photons + read noise

    @property
    def flux_per_cps(self) -> float:
        """Image flux units per e-/s."""
        return 10.0 ** (-0.4 * (self.zero_point - FLUX_MAGZP))

    def cps(self, magnitude: float) -> float:
        return 10.0 ** (-0.4 * (magnitude - self.zero_point))


@cache
def band_observation(band: str) -> BandObservation:
    kwargs = Euclid(band=band).kwargs_single_band()
    kwargs["pixel_scale"] = BANDS[band].pixel_scale  # the challenge's grids, not lenstronomy's 0.101"
    single = SingleBand(**kwargs)
    return BandObservation(band, kwargs["magnitude_zero_point"], single.exposure_time, single.background_noise)


def window(center: tuple[float, float], radius: float | None) -> tuple[slice, slice]:
    """Canvas rows and columns within ``radius`` (arcsec) of ``center``; None: the whole canvas."""
    if radius is None:
        return WHOLE_CANVAS
    half = (CANVAS_SIZE - 1) / 2

    def span(c: float) -> slice:
        lo = max(0, math.floor((c - radius) / CANVAS_PIXEL + half))
        hi = min(CANVAS_SIZE, math.ceil((c + radius) / CANVAS_PIXEL + half) + 1)
        return slice(lo, max(lo, hi))

    return span(center[1]), span(center[0])


@dataclass(frozen=True)
class Psf:
    """One band's PSF (the randomised presets; ``classic`` is a round Gaussian of ``fwhm``).

    gaussian: exp(-r^2 / 2 s^2); moffat: (1 + (r/a)^2)^-beta with FWHM = 2 a sqrt(2^(1/beta) - 1);
    moffat_wings: a Moffat core plus a Moffat (beta 1.8) halo carrying ``wing_fraction`` of the flux at
    ``wing_scale`` x the FWHM; double_gaussian: the same with Gaussians. ``q``/``phi``: the core's axis
    ratio and angle (r is measured in the core's elliptical frame).
    """

    kind: str
    fwhm: float  # arcsec
    beta: float = 0.0
    wing_fraction: float = 0.0
    wing_scale: float = 1.0
    q: float = 1.0
    phi: float = 0.0

    def kernel(self, pixel_scale: float) -> np.ndarray:
        """The PSF sampled on pixels of ``pixel_scale`` (3x3 sub-pixels each), normalised to unit sum."""
        return _kernel(self, pixel_scale).copy()


@lru_cache(maxsize=8)  # the VIS kernel serves the three light groups of one object
def _kernel(psf: Psf, pixel_scale: float) -> np.ndarray:
    halo_fwhm = psf.fwhm * (psf.wing_scale if psf.wing_fraction > 0 else 1.0)
    # Beyond ~4 core FWHM (Moffat core) or 2.5 halo FWHM the truncated light is a few per cent at most.
    reach = max(4.0 * psf.fwhm, 2.5 * halo_fwhm) if psf.kind != "gaussian" else 2.0 * psf.fwhm
    radius = int(min(math.ceil(reach / pixel_scale) + 1, 30))
    n = 2 * radius + 1
    sub = (np.arange(3 * n) - (3 * n - 1) / 2) / 3.0 * pixel_scale
    y, x = np.meshgrid(sub, sub, indexing="ij")
    major = math.cos(psf.phi) * x + math.sin(psf.phi) * y
    minor = (-math.sin(psf.phi) * x + math.cos(psf.phi) * y) / psf.q
    core_r = np.hypot(major, minor)
    if psf.kind in ("moffat", "moffat_wings"):
        image = _normalised(_moffat(core_r, psf.fwhm, psf.beta))
    else:
        image = _normalised(_gaussian(core_r, psf.fwhm))
    if psf.kind in ("moffat_wings", "double_gaussian"):
        r = np.hypot(x, y)
        halo = _moffat(r, halo_fwhm, 1.8) if psf.kind == "moffat_wings" else _gaussian(r, halo_fwhm)
        image = (1 - psf.wing_fraction) * image + psf.wing_fraction * _normalised(halo)
    pixels = image.reshape(n, 3, n, 3).sum(axis=(1, 3))
    return pixels / pixels.sum()


def _moffat(r: np.ndarray, fwhm: float, beta: float) -> np.ndarray:
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (1.0 + (r / alpha) ** 2) ** (-beta)


def _gaussian(r: np.ndarray, fwhm: float) -> np.ndarray:
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return np.exp(-0.5 * (r / sigma) ** 2)


def _normalised(image: np.ndarray) -> np.ndarray:
    return image / image.sum()


@dataclass(frozen=True)
class BandNoise:
    """One band's noise draw (the randomised presets; ``classic`` is the nominal depth, white)."""

    sky_scale: float = 1.0  # x the nominal background sigma
    exposure_scale: float = 1.0  # x the nominal exposure (Poisson term: model / exposure)
    gradient: tuple[float, float, float] = (0.0, 0.0, 0.0)  # pedestal, d/dx, d/dy across the stamp (sigmas)
    correlation: float = 0.0  # Gaussian smoothing (pixels) of the noise field, variance kept; 0: white
