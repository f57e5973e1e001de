"""Challenge-format simulated data sets: lenstronomy scenes -> four-band FITS cutouts + the catalogue.

Per object (pure, no I/O): draw a scene (lens galaxy mass and light, an optional lensed source,
companions, spiral or ring structure) -> render each light component once on a 0.1"/px canvas ->
per band: colours, Gaussian PSF, the band's pixel grid, noise -> measure the catalogue quantities ->
inject the real data's image quirks (NaN pixels, off-size NIR stamps). The driver plans the data set
(which IDs are lenses, which rows lose their images or repeat), fans chunks of IDs out to Ray tasks
that write the FITS files, and writes the catalogue from the rows they send back.

Every object's randomness comes from ``SeedSequence(seed, spawn_key=(1, ID))``, so the output depends
on the seed and the ID only, never on the number of workers or the chunking.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from astropy.cosmology import FlatLambdaCDM
from astropy.io import fits
from lenstronomy.Cosmo.lens_cosmo import LensCosmo
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.SimulationAPI.observation_api import SingleBand
from lenstronomy.SimulationAPI.ObservationConfig.Euclid import Euclid
from lenstronomy.Util import param_util
from scipy import ndimage

from lensray import storage
from lensray.config import SimulateConfig
from lensray.runtime import ensure_ray
from lensray.sky.bands import BAND_NAMES, BANDS, NIR_BANDS, band_relpath
from lensray.sky.catalog import CATALOG_NAME, COLUMNS

# ---------------------------------------------------------------------------------------------------
# Instrument, units, canvas

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
_CANVAS_Y, _CANVAS_X = np.meshgrid(_AXIS, _AXIS, indexing="ij")  # row = y, column = x (arcsec)

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


@cache
def _lens_model() -> LensModel:
    return LensModel(["SIE", "SHEAR"])


@cache
def _light_model(profile: str) -> LightModel:
    return LightModel([profile])


@cache
def _lens_solver() -> LensEquationSolver:
    return LensEquationSolver(_lens_model())


# ---------------------------------------------------------------------------------------------------
# Light shapes: surface brightness in arbitrary units (every rendered map is normalised afterwards)


@dataclass(frozen=True)
class Sersic:
    """An elliptical Sersic profile (lenstronomy SERSIC_ELLIPSE)."""

    r_eff: float
    n: float
    q: float
    phi: float
    center: tuple[float, float]

    @property
    def kwargs(self) -> dict[str, float]:
        e1, e2 = param_util.phi_q2_ellipticity(self.phi, self.q)
        return dict(
            R_sersic=self.r_eff, n_sersic=self.n, e1=e1, e2=e2, center_x=self.center[0], center_y=self.center[1]
        )

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _light_model("SERSIC_ELLIPSE").surface_brightness(x, y, [dict(amp=1.0, **self.kwargs)])


@dataclass(frozen=True)
class Knots:
    """Small Gaussian star-forming knots carrying ``fractions`` of the light each."""

    centers: tuple[tuple[float, float], ...]
    sigmas: tuple[float, ...]
    fractions: tuple[float, ...]

    @property
    def center(self) -> tuple[float, float]:
        return tuple(np.mean(self.centers, axis=0)) if self.centers else (0.0, 0.0)

    @property
    def extent(self) -> float:
        return max(
            (
                math.hypot(cx - self.center[0], cy - self.center[1]) + 5 * s
                for (cx, cy), s in zip(self.centers, self.sigmas, strict=False)
            ),
            default=0.0,
        )

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        gauss = _light_model("GAUSSIAN")  # lenstronomy's GAUSSIAN amp is the total flux
        sb = np.zeros(np.shape(x))
        for (cx, cy), sigma, fraction in zip(self.centers, self.sigmas, self.fractions, strict=False):
            sb += gauss.surface_brightness(x, y, [dict(amp=fraction, sigma=sigma, center_x=cx, center_y=cy)])
        return sb


@dataclass(frozen=True)
class ClumpySource:
    """A Sersic source plus knots carrying part of its flux."""

    body: Sersic
    knots: Knots = Knots((), (), ())

    @property
    def center(self) -> tuple[float, float]:
        return self.body.center

    @property
    def extent(self) -> float:
        """Radius (arcsec) beyond which the unlensed source is negligible."""
        (kx, ky), (cx, cy) = self.knots.center, self.center
        knots = math.hypot(kx - cx, ky - cy) + self.knots.extent
        return max(8 * self.body.r_eff + 0.5, knots if self.knots.centers else 0.0)

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        body_model = _light_model("SERSIC_ELLIPSE")
        body_kwargs = dict(amp=1.0, **self.body.kwargs)
        # Flux fractions: lenstronomy's total_flux turns the body's into an amplitude.
        body_fraction = 1.0 - sum(self.knots.fractions)
        amplitude = body_fraction / body_model.total_flux([body_kwargs])[0]
        body = amplitude * body_model.surface_brightness(x, y, [body_kwargs])
        return body + self.knots.surface_brightness(x, y) if self.knots.centers else body


@dataclass(frozen=True)
class SpiralArms:
    """The arm light of an exponential disc: the disc modulated by m logarithmic spiral arms, fading
    into a smooth centre."""

    disc: Sersic
    arms: int
    pitch: float  # radians
    phase: float
    sharpness: float  # power of the (1 + cos)/2 modulation: larger -> narrower arms

    @property
    def center(self) -> tuple[float, float]:
        return self.disc.center

    def winding(self, radius: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(radius, 0.05) / self.disc.r_eff) / math.tan(self.pitch)

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        radius, angle = _disc_polar(x, y, self.disc.center, self.disc.phi, self.disc.q)
        modulation = (0.5 * (1.0 + np.cos(self.arms * (angle - self.winding(radius)) + self.phase))) ** self.sharpness
        onset = 1.0 - np.exp(-((radius / (0.6 * self.disc.r_eff)) ** 2))  # no arms inside the bulge
        return self.disc.surface_brightness(x, y) * modulation * onset

    def crest(self, radius: np.ndarray, arm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sky positions on arm number ``arm``'s crest at (deprojected) ``radius``."""
        angle = self.winding(radius) + (2 * math.pi * arm - self.phase) / self.arms
        disc = self.disc
        return _disc_to_sky(radius * np.cos(angle), radius * np.sin(angle), disc.center, disc.phi, disc.q)


@dataclass(frozen=True)
class Ring:
    """A (partial) ring of star formation around a galaxy: the hard non-lens that looks like an
    Einstein ring or an arc."""

    center: tuple[float, float]
    radius: float
    width: float
    q: float
    phi: float
    arc_power: float  # 0: a full ring; larger: a shorter arc centred on arc_angle
    arc_angle: float

    def arc(self, angle: np.ndarray) -> np.ndarray:
        return (0.5 * (1.0 + np.cos(angle - self.arc_angle))) ** self.arc_power

    def surface_brightness(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        radius, angle = _disc_polar(x, y, self.center, self.phi, self.q)
        return np.exp(-0.5 * ((radius - self.radius) / self.width) ** 2) * self.arc(angle)

    def on_ring(self, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sky positions on the ring's crest at (deprojected) position angle ``angle``."""
        return _disc_to_sky(self.radius * np.cos(angle), self.radius * np.sin(angle), self.center, self.phi, self.q)


def _disc_polar(x: np.ndarray, y: np.ndarray, center: tuple[float, float], phi: float, q: float):
    """Radius and angle in the deprojected frame of an inclined disc (axis ratio q, major axis at phi)."""
    dx, dy = x - center[0], y - center[1]
    major = math.cos(phi) * dx + math.sin(phi) * dy
    minor = (-math.sin(phi) * dx + math.cos(phi) * dy) / q
    return np.hypot(major, minor), np.arctan2(minor, major)


def _disc_to_sky(major, minor, center: tuple[float, float], phi: float, q: float):
    """The inverse of ``_disc_polar``'s projection: disc-frame (major, deprojected minor) -> sky x, y."""
    minor = minor * q
    return (
        center[0] + math.cos(phi) * major - math.sin(phi) * minor,
        center[1] + math.sin(phi) * major + math.cos(phi) * minor,
    )


Shape = Sersic | Knots | ClumpySource | SpiralArms | Ring


@dataclass(frozen=True)
class LightPart:
    """One light component with its VIS magnitude and VIS - H colour (AB)."""

    group: str  # "lens" (the central galaxy), "companion" or "source" (lensed)
    shape: Shape
    mag_vis: float
    vis_minus_h: float
    window: float | None = None  # render only within this radius (arcsec) of the centre; None = everywhere
    core: float = 0.0  # supersample within this radius of the centre

    def magnitude(self, band: str) -> float:
        return self.mag_vis - COLOR_WEIGHT[band] * self.vis_minus_h


# ---------------------------------------------------------------------------------------------------
# Draw a scene


@dataclass(frozen=True)
class Scene:
    kind: str  # elliptical, spiral or ring (the central galaxy's morphology)
    z_lens: float
    z_source: float  # 0 without a source
    theta_e: float  # Einstein radius (arcsec) for the source (non-lenses: for a drawn source plane)
    sigma_v: float  # km/s
    star_mass: float  # M_sun
    halo_mass: float  # M_sun
    mag_lens: float  # VIS magnitude of the central galaxy
    lens_vis_minus_h: float
    kwargs_lens: tuple[dict[str, float], ...]
    parts: tuple[LightPart, ...]
    source: ClumpySource | None
    source_id: int
    mag_source: float  # unlensed VIS magnitude, 0 without a source
    source_vis_minus_h: float
    companion_radii: tuple[float, ...]  # distances (arcsec) of companions from the lens centre
    psf_fwhm: dict[str, float]


def draw_scene(rng: np.random.Generator, is_lens: bool, config: SimulateConfig) -> Scene:
    """All the physical parameters of one object: a lens-galaxy population shared by both classes."""
    z_lens = rng.uniform(0.2, 0.9)
    z_source = rng.uniform(max(z_lens + 0.4, 1.0), 3.5)  # drawn for non-lenses too: it sets theta_E <-> mass
    theta_e = math.exp(rng.uniform(math.log(0.3), math.log(2.0)))
    sigma_v = float(LensCosmo(z_lens, z_source, COSMOLOGY).sis_theta_E2sigma_v(theta_e))
    # Scaling relations with scatter: sigma -> M* (Zahid et al. 2016), M* -> halo (massive end of SHMR).
    log_mstar = 10.9 + (math.log10(sigma_v) - 2.21) / 0.286 + rng.normal(0.0, 0.1)
    log_mhalo = 13.0 + 1.8 * (log_mstar - 11.3) + rng.normal(0.0, 0.2)
    # Light from mass: M/L ~ 3, crude K-correction + evolution of an old population.
    abs_mag = 4.65 - 2.5 * (log_mstar - math.log10(3.0))
    mag_lens = abs_mag + float(COSMOLOGY.distmod(z_lens).value) + 1.0 * z_lens + rng.normal(0.0, 0.25)
    kpc_per_arcsec = float(COSMOLOGY.angular_diameter_distance(z_lens).value) * 1e3 / 206264.8
    r_eff = float(np.clip(10 ** (0.7 + 0.56 * (log_mstar - 11.0) + rng.normal(0.0, 0.1)) / kpc_per_arcsec, 0.2, 3.0))
    lens_color = rng.normal(1.6 + 0.5 * (z_lens - 0.5), 0.15)  # red: old stars

    center = tuple(rng.normal(0.0, 0.03, size=2))
    mass_q, mass_phi = rng.uniform(0.55, 1.0), rng.uniform(0.0, math.pi)
    e1, e2 = param_util.phi_q2_ellipticity(mass_phi, mass_q)
    gamma1, gamma2 = param_util.shear_polar2cartesian(rng.uniform(0.0, math.pi), rng.uniform(0.0, 0.08))
    kwargs_lens = (
        dict(theta_E=theta_e, e1=e1, e2=e2, center_x=center[0], center_y=center[1]),
        dict(gamma1=gamma1, gamma2=gamma2, ra_0=0.0, dec_0=0.0),
    )
    light_q = float(np.clip(mass_q + rng.normal(0.0, 0.05), 0.4, 1.0))
    light_phi = mass_phi + rng.normal(0.0, math.radians(10.0))
    kind = "elliptical"
    if not is_lens and rng.random() < config.spiral_rate:
        kind = "spiral" if rng.random() < 0.6 else "ring"
    parts = list(_galaxy_parts(rng, kind, r_eff, light_q, light_phi, center, mag_lens, lens_color))

    companion_radii: list[float] = []
    if rng.random() < config.companion_rate:
        for _ in range(1 + rng.poisson(1.5)):
            part, radius = _companion(rng, mag_lens, lens_color, center)
            parts.append(part)
            companion_radii.append(radius)

    source, source_id, mag_source, source_color = None, 0, 0.0, 0.0
    if is_lens:
        mag_source = rng.uniform(23.0, 27.5)
        source_color = rng.normal(0.4, 0.25)  # blue: star-forming at z ~ 1-3
        source = _draw_source(rng, theta_e, center, mag_source)
        source_id = int(rng.integers(100_000, 1_000_000))
        parts.append(LightPart("source", source, mag_source, source_color))
    else:
        z_source = 0.0

    psf_fwhm = {band: rng.uniform(*PSF_FWHM_RANGE[band]) for band in BAND_NAMES}
    # The catalogue's mag_lens is the whole central galaxy's, a ring included.
    mag_lens = -2.5 * math.log10(sum(10 ** (-0.4 * p.mag_vis) for p in parts if p.group == "lens"))
    return Scene(
        kind=kind,
        z_lens=z_lens,
        z_source=z_source,
        theta_e=theta_e,
        sigma_v=sigma_v,
        star_mass=10**log_mstar,
        halo_mass=10**log_mhalo,
        mag_lens=mag_lens,
        lens_vis_minus_h=lens_color,
        kwargs_lens=kwargs_lens,
        parts=tuple(parts),
        source=source,
        source_id=source_id,
        mag_source=mag_source,
        source_vis_minus_h=source_color,
        companion_radii=tuple(companion_radii),
        psf_fwhm=psf_fwhm,
    )


def _galaxy_parts(rng, kind, r_eff, q, phi, center, mag, color) -> Iterator[LightPart]:
    """The central galaxy's light: an elliptical; a bulge + disc with spiral arms and knots; or an
    elliptical with a (partial, knotty) star-forming ring."""

    def share(fraction: float) -> float:
        return mag - 2.5 * math.log10(fraction)

    if kind == "spiral":
        bulge_fraction, arm_fraction = rng.uniform(0.15, 0.35), rng.uniform(0.2, 0.35)
        knot_fraction = rng.uniform(0.05, 0.12)
        disc = Sersic(rng.uniform(0.4, 1.2), 1.0, rng.uniform(0.45, 1.0), rng.uniform(0.0, math.pi), center)
        bulge = Sersic(rng.uniform(0.1, 0.3), rng.uniform(2.0, 4.0), rng.uniform(0.7, 1.0), disc.phi, center)
        arms = SpiralArms(
            disc,
            int(rng.choice([2, 2, 3])),
            math.radians(rng.uniform(15.0, 35.0)),
            rng.uniform(0.0, 2 * math.pi),
            rng.uniform(1.0, 3.0),
        )
        n_knots = int(rng.integers(4, 16))
        knot_x, knot_y = arms.crest(disc.r_eff * rng.uniform(0.6, 2.5, n_knots), rng.integers(0, arms.arms, n_knots))
        knots = _knots(rng, knot_x, knot_y, n_knots)
        yield LightPart("lens", bulge, share(bulge_fraction), color, core=0.5)
        yield LightPart("lens", disc, share(1 - bulge_fraction - arm_fraction - knot_fraction), color - 0.4)
        yield LightPart("lens", arms, share(arm_fraction), rng.normal(0.6, 0.2))
        yield LightPart("lens", knots, share(knot_fraction), rng.normal(0.3, 0.2))
        return
    yield LightPart("lens", Sersic(r_eff, rng.uniform(2.5, 5.5), q, phi, center), mag, color, core=0.5)
    if kind == "ring":
        ring_q = float(np.clip(q + rng.normal(0, 0.1), 0.5, 1.0))
        ring = Ring(
            center,
            rng.uniform(0.6, 2.0),
            rng.uniform(0.04, 0.12),
            ring_q,
            phi,
            float(rng.choice([0.0, 1.0, 3.0])),
            rng.uniform(0.0, 2 * math.pi),
        )
        ring_mag, ring_color = mag + rng.uniform(0.3, 2.0), rng.normal(0.6, 0.3)
        yield LightPart("lens", ring, ring_mag, ring_color)
        if rng.random() < 0.5:  # collisional rings are clumpy
            n_knots = int(rng.integers(3, 10))
            angles = ring.arc_angle + rng.normal(0.0, 2.0 / (1.0 + ring.arc_power), n_knots)
            knots = _knots(rng, *ring.on_ring(angles), n_knots)
            yield LightPart("lens", knots, ring_mag + rng.uniform(0.5, 1.5), ring_color - 0.2)


def _knots(rng, x: np.ndarray, y: np.ndarray, n: int) -> Knots:
    fractions = tuple(rng.dirichlet(np.ones(n)))
    return Knots(tuple(zip(x.tolist(), y.tolist(), strict=False)), tuple(rng.uniform(0.03, 0.07, n)), fractions)


def _companion(rng, mag_lens, lens_color, lens_center) -> tuple[LightPart, float]:
    """A small galaxy near the lens: half red like the lens, half blue like a source, so neither colour nor
    presence gives the label away."""
    radius = rng.uniform(0.8, 5.0) if rng.random() < 0.7 else rng.uniform(5.0, 9.5)
    angle = rng.uniform(0.0, 2 * math.pi)
    center = (lens_center[0] + radius * math.cos(angle), lens_center[1] + radius * math.sin(angle))
    r_eff = math.exp(rng.uniform(math.log(0.08), math.log(0.4)))
    shape = Sersic(r_eff, rng.uniform(0.8, 4.0), rng.uniform(0.3, 1.0), rng.uniform(0.0, math.pi), center)
    mag = max(rng.uniform(21.5, 25.5), mag_lens + 1.0)
    color = lens_color + rng.normal(0.0, 0.2) if rng.random() < 0.5 else rng.normal(0.4, 0.25)
    part = LightPart("companion", shape, mag, color, window=max(1.0, 10 * r_eff), core=4 * r_eff + 0.15)
    return part, radius


def _draw_source(rng, theta_e, lens_center, mag_source) -> ClumpySource:
    """Source offset from the lens in units of theta_E: inside the cut (multiple images, mag_eff ~2-30)
    60 % of the time, else outside it (one image, mag_eff ~1.1-2), so weak lenses are common."""
    r_eff = float(np.clip(10 ** rng.normal(math.log10(0.15) - 0.08 * (mag_source - 24.5), 0.18), 0.05, 0.6))
    offset = rng.uniform(0.02, 1.0) if rng.random() < 0.6 else rng.uniform(1.0, 6.0)
    # Keep the whole lensed source inside the stamp, so mag_eff is never cut down by its edge.
    offset = min(offset * theta_e, 9.0 - theta_e - 4 * r_eff)
    angle = rng.uniform(0.0, 2 * math.pi)
    center = (lens_center[0] + offset * math.cos(angle), lens_center[1] + offset * math.sin(angle))
    body = Sersic(r_eff, rng.uniform(0.7, 2.5), rng.uniform(0.35, 1.0), rng.uniform(0.0, math.pi), center)
    if rng.random() >= 0.5:
        return ClumpySource(body)
    n_knots = int(rng.integers(1, 5))
    offsets = rng.normal(0.0, 1.2 * r_eff, size=(n_knots, 2))
    fractions = rng.dirichlet(np.ones(n_knots)) * rng.uniform(0.2, 0.5)
    knots = Knots(
        tuple((center[0] + dx, center[1] + dy) for dx, dy in offsets.tolist()),
        tuple(rng.uniform(0.02, 0.06, n_knots)),
        tuple(fractions),
    )
    return ClumpySource(body, knots)


# ---------------------------------------------------------------------------------------------------
# Render: one unit-flux map per light part on the canvas


_WHOLE_CANVAS = (slice(None), slice(None))


def _window(center: tuple[float, float], radius: float | None) -> tuple[slice, slice]:
    """Canvas rows and columns within ``radius`` (arcsec) of ``center``; None: the whole canvas."""
    if radius is None:
        return _WHOLE_CANVAS
    half = (CANVAS_SIZE - 1) / 2

    def span(c: float) -> slice:
        lo = max(0, math.floor((c - radius) / CANVAS_PIXEL + half))
        hi = min(CANVAS_SIZE, math.ceil((c + radius) / CANVAS_PIXEL + half) + 1)
        return slice(lo, max(lo, hi))

    return span(center[1]), span(center[0])


def _render(
    surface_brightness: Callable[[np.ndarray, np.ndarray], np.ndarray],
    window: tuple[slice, slice],
    supersample: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    factor: int = 4,
) -> np.ndarray:
    """Pixel-averaged surface brightness on the canvas: pixel centres everywhere, factor x factor
    sub-pixels only where ``supersample(x, y, first_pass)`` says the light varies fast (lenstronomy's
    adaptive supersampling idea, at a fraction of the cost of supersampling the whole canvas)."""
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE))
    x, y = _CANVAS_X[window], _CANVAS_Y[window]
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
    canvas[window] = values
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
    maps: list[np.ndarray] = []
    magnification = 0.0
    for part in scene.parts:
        shape = part.shape
        if isinstance(shape, ClumpySource):  # the lensed source: rendered with and without the lens
            unlensed = _render(shape.surface_brightness, _window(shape.center, shape.extent), _bright(1e-3))
            lens_model, kwargs_lens = _lens_model(), list(scene.kwargs_lens)

            def lensed_sb(x, y, shape=shape, lens_model=lens_model, kwargs_lens=kwargs_lens):
                return shape.surface_brightness(*lens_model.ray_shooting(x, y, kwargs_lens))

            lensed = _render(lensed_sb, _WHOLE_CANVAS, _bright(1e-3))
            total = unlensed.sum()
            magnification = float(lensed.sum() / total)
            maps.append(lensed / total)
            continue
        if isinstance(shape, Knots):
            unit = _render(shape.surface_brightness, _window(shape.center, shape.extent), _bright(0.02))
        elif isinstance(shape, Ring):
            unit = _render(shape.surface_brightness, _WHOLE_CANVAS, _bright(0.05))
        else:
            unit = _render(shape.surface_brightness, _window(shape.center, part.window), _near(shape.center, part.core))
        maps.append(unit / unit.sum())
    return RenderedScene(tuple(maps), magnification)


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


# ---------------------------------------------------------------------------------------------------
# Measure the catalogue quantities


FIELD_DESCRIPTIONS: dict[str, str] = {
    "ID": "object identifier; images EUC_<band>/imageEUC_<band>-<ID>.fits",
    "x_crit": "x of the tangential critical curve's centroid (VIS pixels, 0-based; the lens centre if none)",
    "y_crit": "y of the tangential critical curve's centroid (VIS pixels, 0-based; the lens centre if none)",
    "source_ID": "identifier of the lensed source (0: no source)",
    "z_source": "source redshift (0: no source)",
    "z_lens": "lens galaxy redshift",
    "mag_source": "unlensed VIS AB magnitude of the source (0: no source)",
    "ein_area": "area inside the Einstein radius, pi*theta_E^2 (arcsec^2)",
    "n_crit": "number of critical curves (connected regions of negative magnification) in the VIS stamp",
    "r_source": "source effective (Sersic) radius (arcsec; 0: no source)",
    "crit_area": "area inside the critical curves (arcsec^2)",
    "n_pix_source": "VIS pixels where the noiseless lensed source exceeds 1 sigma of the background noise",
    "source_flux": "lensed source flux in the VIS stamp (image units)",
    "n_pix_lens": "VIS pixels where the noiseless lens galaxy exceeds 1 sigma of the background noise",
    "lens_flux": "lens galaxy flux in the VIS stamp (image units)",
    "n_source_im": "images of the source centre (lens equation) falling on detected source pixels",
    "mag_eff": "effective magnification: lensed / unlensed source flux (0: no source)",
    "sb_contrast": "lensed source / lens galaxy flux over the source's detected VIS pixels (0: none)",
    "color_diff": "(VIS-H) of the lens minus (VIS-H) of the source (AB mag; 0: no source)",
    "n_gal_3": "companion galaxies within 3 arcsec of the lens",
    "n_gal_5": "companion galaxies within 5 arcsec of the lens",
    "n_gal_10": "companion galaxies within 10 arcsec of the lens",
    "halo_mass": "lens halo mass (M_sun)",
    "star_mass": "lens stellar mass (M_sun)",
    "mag_lens": "VIS AB magnitude of the lens galaxy (not a magnification)",
    "n_sources": "number of lensed sources (0: not a lens)",
}
INT_COLUMNS = frozenset(
    {
        "ID",
        "source_ID",
        "n_crit",
        "n_pix_source",
        "n_pix_lens",
        "n_source_im",
        "n_gal_3",
        "n_gal_5",
        "n_gal_10",
        "n_sources",
    }
)


def measure(
    object_id: int, scene: Scene, rendered: RenderedScene, vis_groups: dict[str, np.ndarray]
) -> dict[str, float]:
    """The 26 catalogue columns of one object, measured on its noiseless VIS maps and its mass model."""
    vis = band_observation("VIS")
    flux = vis.flux_per_cps
    lens_map, source_map = vis_groups["lens"], vis_groups["source"]
    lens_pixels = lens_map > vis.noise_cps
    x_crit, y_crit, n_crit, crit_area = _critical_curves(scene)
    row: dict[str, float] = dict(
        ID=int(object_id),
        x_crit=x_crit,
        y_crit=y_crit,
        source_ID=0,
        z_source=0.0,
        z_lens=scene.z_lens,
        mag_source=0.0,
        ein_area=math.pi * scene.theta_e**2,
        n_crit=n_crit,
        r_source=0.0,
        crit_area=crit_area,
        n_pix_source=0,
        source_flux=0.0,
        n_pix_lens=int(lens_pixels.sum()),
        lens_flux=float(lens_map.sum() * flux),
        n_source_im=0,
        mag_eff=0.0,
        sb_contrast=0.0,
        color_diff=0.0,
        n_gal_3=sum(r < 3.0 for r in scene.companion_radii),
        n_gal_5=sum(r < 5.0 for r in scene.companion_radii),
        n_gal_10=sum(r < 10.0 for r in scene.companion_radii),
        halo_mass=scene.halo_mass,
        star_mass=scene.star_mass,
        mag_lens=scene.mag_lens,
        n_sources=0,
    )
    if scene.source is None:
        return row
    source_pixels = source_map > vis.noise_cps
    n_pix_source = int(source_pixels.sum())
    row.update(
        source_ID=scene.source_id,
        z_source=scene.z_source,
        mag_source=scene.mag_source,
        r_source=scene.source.body.r_eff,
        n_pix_source=n_pix_source,
        source_flux=float(source_map.sum() * flux),
        n_source_im=_visible_images(scene, source_pixels),
        mag_eff=rendered.magnification,
        sb_contrast=float(source_map[source_pixels].sum() / lens_map[source_pixels].sum()) if n_pix_source else 0.0,
        color_diff=scene.lens_vis_minus_h - scene.source_vis_minus_h,
        n_sources=1,
    )
    return row


def _vis_pixel(x: float, y: float) -> tuple[float, float]:
    """Arcsec (stamp centre = 0) -> 0-based VIS pixel coordinates (column, row)."""
    centre = (BANDS["VIS"].size - 1) / 2
    return x / CANVAS_PIXEL + centre, y / CANVAS_PIXEL + centre


def _critical_curves(scene: Scene) -> tuple[float, float, int, float]:
    """Centroid (VIS px), count and enclosed area (arcsec^2) of the regions of negative magnification,
    from the lens model's Hessian at the VIS pixel centres near the lens (where they all lie for
    q >= 0.55 and shear <= 0.08)."""
    center = scene.kwargs_lens[0]
    rows, cols = _window((center["center_x"], center["center_y"]), 3.0 * scene.theta_e + 0.5)
    vis = slice(VIS_MARGIN, VIS_MARGIN + BANDS["VIS"].size)
    rows = slice(max(rows.start, vis.start), min(rows.stop, vis.stop))
    cols = slice(max(cols.start, vis.start), min(cols.stop, vis.stop))
    x, y = _CANVAS_X[rows, cols], _CANVAS_Y[rows, cols]
    f_xx, f_xy, _, f_yy = _lens_model().hessian(x.ravel(), y.ravel(), list(scene.kwargs_lens))
    inside = ((1 - f_xx) * (1 - f_yy) - f_xy**2 < 0).reshape(x.shape)
    if not inside.any():
        x_pix, y_pix = _vis_pixel(center["center_x"], center["center_y"])
        return x_pix, y_pix, 0, 0.0
    _, n_regions = ndimage.label(inside)
    r, c = np.nonzero(inside)
    offset = rows.start - VIS_MARGIN, cols.start - VIS_MARGIN
    area = float(inside.sum() * CANVAS_PIXEL**2)
    return float(c.mean() + offset[1]), float(r.mean() + offset[0]), int(n_regions), area


def _visible_images(scene: Scene, source_pixels: np.ndarray) -> int:
    """Images of the source centre (analytical SIE + shear solver) that land on detected source pixels."""
    assert scene.source is not None
    x_img, y_img = _lens_solver().image_position_from_source(
        *scene.source.center, list(scene.kwargs_lens), solver="analytical", magnification_limit=0.1
    )
    size = source_pixels.shape[0]
    count = 0
    for x, y in zip(np.atleast_1d(x_img), np.atleast_1d(y_img), strict=False):
        col, row = (round(v) for v in _vis_pixel(float(x), float(y)))
        count += bool(0 <= row < size and 0 <= col < size and source_pixels[row, col])
    return count


# ---------------------------------------------------------------------------------------------------
# Image quirks of the real data


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


# ---------------------------------------------------------------------------------------------------
# One object


@dataclass(frozen=True)
class SimulatedObject:
    object_id: int
    is_lens: bool
    kind: str  # elliptical, spiral or ring
    images: dict[str, np.ndarray]  # band -> float32 image in flux units
    row: dict[str, float]  # the 26 catalogue columns
    quirks: ImageQuirks
    psf_fwhm: dict[str, float]


def object_rng(seed: int, object_id: int) -> np.random.Generator:
    """The random stream of one ID: independent of every other ID, of chunking and of workers."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, int(object_id))))


def simulate_object(object_id: int, is_lens: bool, rng: np.random.Generator, config: SimulateConfig) -> SimulatedObject:
    """Draw, render, observe and measure one object; inject its image quirks. Pure: no I/O."""
    scene_rng, noise_rng, quirk_rng = rng.spawn(3)
    scene = draw_scene(scene_rng, is_lens, config)
    nir_sizes = draw_nir_sizes(quirk_rng, config)
    rendered = render_scene(scene)
    band_rngs = dict(
        zip(BAND_NAMES, noise_rng.spawn(len(BAND_NAMES)), strict=False)
    )  # an off-size band leaves the others alone
    images, vis_groups = observe(scene, rendered, band_rngs, nir_sizes)
    row = measure(object_id, scene, rendered, vis_groups)
    nan_pixels = inject_nan_pixels(images, quirk_rng, config)
    return SimulatedObject(
        int(object_id), bool(is_lens), scene.kind, images, row, ImageQuirks(nir_sizes, nan_pixels), scene.psf_fwhm
    )


def fits_bytes(obj: SimulatedObject, band: str, seed: int) -> bytes:
    obs = band_observation(band)
    header = fits.Header()
    header["BAND"] = (band, "Euclid-like band")
    header["ID"] = (obj.object_id, "object identifier")
    header["PIXSCALE"] = (BANDS[band].pixel_scale, "arcsec per pixel")
    header["BUNIT"] = ("flux", "AB mag = -2.5 log10(flux) + MAGZP")
    header["MAGZP"] = (FLUX_MAGZP, "AB magnitude of unit flux")
    header["PSF_FWHM"] = (round(obj.psf_fwhm[band], 4), "Gaussian PSF FWHM (arcsec)")
    header["SKYSIG"] = (float(f"{obs.noise_cps * obs.flux_per_cps:.4e}"), "background noise sigma per pixel (flux)")
    header["EXPTIME"] = (round(obs.exposure_time, 1), "total exposure time (s)")
    header["ORIGIN"] = ("lensray.simulate", "lenstronomy-based challenge-format simulation")
    header["SIMSEED"] = (int(seed), "simulation seed")
    buffer = io.BytesIO()
    # The header is built here from fixed keys: astropy's output verification would only cost time.
    fits.PrimaryHDU(data=obj.images[band], header=header).writeto(buffer, output_verify="ignore")
    return buffer.getvalue()


def write_object(obj: SimulatedObject, out: str, seed: int) -> None:
    for band in BAND_NAMES:
        storage.write_bytes(storage.join(out, band_relpath(band, obj.object_id)), fits_bytes(obj, band, seed))


# ---------------------------------------------------------------------------------------------------
# The data set: plan, Ray fan-out, catalogue


@dataclass(frozen=True)
class ObjectPlan:
    object_id: int
    is_lens: bool
    missing_images: bool  # catalogue row without image files
    duplicated: bool  # the row appears a second time at the end of the catalogue


def plan_dataset(config: SimulateConfig) -> list[ObjectPlan]:
    """Which IDs are lenses (exactly round(n * lens_fraction), shuffled) and which rows lose images or repeat."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    n_lenses = round(config.n * config.lens_fraction)
    is_lens = np.zeros(config.n, bool)
    is_lens[rng.permutation(config.n)[:n_lenses]] = True
    missing = rng.random(config.n) < config.missing_image_rate
    duplicated = rng.random(config.n) < config.duplicate_id_rate
    return [
        ObjectPlan(config.first_id + k, bool(is_lens[k]), bool(missing[k]), bool(duplicated[k]))
        for k in range(config.n)
    ]


@dataclass(frozen=True)
class ObjectResult:
    """What a Ray task sends back for one object: its row and what was done to it."""

    plan: ObjectPlan
    kind: str
    row: dict[str, float]
    quirks: ImageQuirks


def simulate_chunk(plans: Sequence[ObjectPlan], config: SimulateConfig) -> list[ObjectResult]:
    """Simulate a chunk of IDs and write their images (unless planned missing)."""
    assert config.out is not None
    results = []
    for plan in plans:
        obj = simulate_object(plan.object_id, plan.is_lens, object_rng(config.seed, plan.object_id), config)
        if not plan.missing_images:
            write_object(obj, config.out, config.seed)
        results.append(ObjectResult(plan, obj.kind, obj.row, obj.quirks))
    return results


@dataclass(frozen=True)
class SimulationSummary:
    out: str
    catalog_url: str
    n_objects: int
    n_lenses: int
    n_rows: int
    nan_pixel_ids: tuple[int, ...]
    offsize_nir_ids: tuple[int, ...]
    missing_image_ids: tuple[int, ...]
    duplicate_ids: tuple[int, ...]
    wall_s: float
    workers: int

    @property
    def objects_per_s(self) -> float:
        return self.n_objects / self.wall_s if self.wall_s > 0 else float("inf")

    def __str__(self) -> str:
        def ids(values: tuple[int, ...]) -> str:
            shown = ", ".join(str(v) for v in values[:10])
            return f"{len(values)}" + (f" ({shown}{', ...' if len(values) > 10 else ''})" if values else "")

        return "\n".join(
            [
                f"simulated {self.n_objects} objects ({self.n_lenses} lenses) -> {self.out}",
                f"  catalogue: {self.catalog_url} ({self.n_rows} rows)",
                f"  quirks: NaN pixels {ids(self.nan_pixel_ids)}; off-size NIR {ids(self.offsize_nir_ids)}; "
                f"rows without images {ids(self.missing_image_ids)}; duplicate ID rows {ids(self.duplicate_ids)}",
                f"  {self.wall_s:.1f} s on {self.workers} worker(s): {self.objects_per_s:.1f} objects/s",
            ]
        )


PROGRESS_MIN_OBJECTS = 500  # below this a progress bar is noise


def simulate_dataset(config: SimulateConfig) -> SimulationSummary:
    """Write a challenge-format data set under ``config.out``: FITS per band per ID, then the catalogue."""
    import ray
    from tqdm import tqdm

    if config.out is None:
        raise ValueError("simulate.out is not set: give the data set's root URL (a path or s3://bucket/prefix)")
    start = time.perf_counter()
    storage.check_reachable(config.out, must_exist=False)
    plans = plan_dataset(config)
    ensure_ray()
    workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk = max(1, min(32, math.ceil(len(plans) / (4 * workers))))  # several chunks per worker: load balance
    pending = [plans[k : k + chunk] for k in range(0, len(plans), chunk)]
    remote = ray.remote(num_cpus=1)(simulate_chunk)
    results: list[ObjectResult] = []
    in_flight: list = []
    with tqdm(total=len(plans), unit="obj", desc="simulate", disable=len(plans) < PROGRESS_MIN_OBJECTS or None) as bar:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                in_flight.append(remote.remote(pending.pop(0), config))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            for chunk_results in ray.get(done):
                results.extend(chunk_results)
                bar.update(len(chunk_results))
    results.sort(key=lambda r: r.plan.object_id)
    rows = [r.row for r in results] + [r.row for r in results if r.plan.duplicated]
    catalog_url = storage.join(config.out, CATALOG_NAME)
    storage.write_bytes(catalog_url, catalog_text(rows, config).encode())
    return SimulationSummary(
        out=config.out,
        catalog_url=catalog_url,
        n_objects=len(results),
        n_lenses=sum(r.plan.is_lens for r in results),
        n_rows=len(rows),
        nan_pixel_ids=tuple(r.plan.object_id for r in results if r.quirks.nan_pixels),
        offsize_nir_ids=tuple(r.plan.object_id for r in results if r.quirks.nir_sizes),
        missing_image_ids=tuple(r.plan.object_id for r in results if r.plan.missing_images),
        duplicate_ids=tuple(r.plan.object_id for r in results if r.plan.duplicated),
        wall_s=time.perf_counter() - start,
        workers=workers,
    )


def catalog_text(rows: Sequence[dict[str, float]], config: SimulateConfig) -> str:
    """The challenge's CSV: a ``#`` comment block describing every field, a header row whose first
    (row index) column is unnamed, then one row per entry."""
    lines = [
        "# lensray simulated Bologna Lens Finding Challenge 2.0-format training catalogue",
        f"# seed={config.seed} n={config.n} first_id={config.first_id} lens_fraction={config.lens_fraction}",
        "# The first column is an unnamed row index. Fields:",
        *(f"#   {name}: {FIELD_DESCRIPTIONS[name]}" for name in COLUMNS),
        "," + ",".join(COLUMNS),
    ]
    for index, row in enumerate(rows):
        lines.append(",".join([str(index), *(_format_value(name, row[name]) for name in COLUMNS)]))
    return "\n".join(lines) + "\n"


def _format_value(name: str, value: float) -> str:
    if name in INT_COLUMNS:
        return str(int(value))
    return f"{float(value):.7g}"
