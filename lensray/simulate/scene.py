"""Draw a scene: every physical parameter of one object, from one random stream.

One lens-galaxy population serves both classes (a non-lens is a lens galaxy without a lensed source),
so neither the galaxy nor its companions give the label away. The order of the draws is part of the
output: every object's images depend on it, so a change here changes every data set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

import numpy as np
from lenstronomy.Cosmo.lens_cosmo import LensCosmo
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.Util import param_util

from lensray.config import SimulateConfig
from lensray.simulate.instrument import COSMOLOGY, PSF_FWHM_RANGE, BandNoise, Psf
from lensray.simulate.light import ClumpySource, Knots, LightPart, Ring, Sersic, SpiralArms
from lensray.sky.bands import BAND_NAMES


@cache
def lens_model() -> LensModel:
    """The mass model that ``Scene.kwargs_lens`` parameterise: a singular isothermal ellipsoid + shear."""
    return LensModel(["SIE", "SHEAR"])


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
    # The randomised presets' extras (``randomise.draw_random_scene``); the defaults are classic's.
    preset: str = "classic"
    psf: dict[str, Psf] | None = None  # None: a round Gaussian of psf_fwhm
    noise: dict[str, BandNoise] | None = None  # None: the nominal depth, white
    confuser: str = ""  # the main confuser kind (priors.CONFUSER_KINDS); classic: see truth_kind
    lens_type: str = "none"  # none, strong (source inside the caustic's scale) or weak
    extra_sources: int = 0  # lensed sources beyond the first (parts of group "source")
    artefacts: tuple[str, ...] = ()  # image artefacts to inject after the noise (priors.ARTEFACT_KINDS)


@dataclass(frozen=True)
class _LensGalaxy:
    """The central galaxy's population draws (a lens or not): distances, mass and light."""

    z_lens: float
    z_source: float  # drawn for non-lenses too: it sets theta_E <-> mass
    theta_e: float
    sigma_v: float
    log_mstar: float
    log_mhalo: float
    mag: float  # VIS magnitude from the stellar mass
    r_eff: float
    color: float  # VIS - H


def draw_scene(rng: np.random.Generator, is_lens: bool, config: SimulateConfig) -> Scene:
    """All the physical parameters of one object: a lens-galaxy population shared by both classes."""
    galaxy = _draw_galaxy(rng)
    kwargs_lens, center, light_q, light_phi = draw_mass(rng, galaxy.theta_e)
    kind = "elliptical"
    if not is_lens and rng.random() < config.spiral_rate:
        kind = "spiral" if rng.random() < 0.6 else "ring"
    parts = list(_galaxy_parts(rng, kind, galaxy.r_eff, light_q, light_phi, center, galaxy.mag, galaxy.color))
    companions = []
    if rng.random() < config.companion_rate:
        companions = [companion(rng, galaxy.mag, galaxy.color, center) for _ in range(1 + rng.poisson(1.5))]
    parts += [part for part, _ in companions]
    source, source_id = _draw_lensed_source(rng, galaxy.theta_e, center) if is_lens else (None, 0)
    if source is not None:
        parts.append(source)
    psf_fwhm = {band: rng.uniform(*PSF_FWHM_RANGE[band]) for band in BAND_NAMES}
    # The catalogue's mag_lens is the whole central galaxy's, a ring included.
    mag_lens = -2.5 * math.log10(sum(10 ** (-0.4 * p.mag_vis) for p in parts if p.group == "lens"))
    return Scene(
        kind=kind,
        z_lens=galaxy.z_lens,
        z_source=galaxy.z_source if is_lens else 0.0,
        theta_e=galaxy.theta_e,
        sigma_v=galaxy.sigma_v,
        star_mass=10**galaxy.log_mstar,
        halo_mass=10**galaxy.log_mhalo,
        mag_lens=mag_lens,
        lens_vis_minus_h=galaxy.color,
        kwargs_lens=kwargs_lens,
        parts=tuple(parts),
        source=source.shape if source is not None else None,
        source_id=source_id,
        mag_source=source.mag_vis if source is not None else 0.0,
        source_vis_minus_h=source.vis_minus_h if source is not None else 0.0,
        companion_radii=tuple(radius for _, radius in companions),
        psf_fwhm=psf_fwhm,
    )


def _draw_galaxy(rng: np.random.Generator) -> _LensGalaxy:
    """Redshifts and Einstein radius first, then mass and light from scaling relations with scatter."""
    z_lens = rng.uniform(0.2, 0.9)
    z_source = rng.uniform(max(z_lens + 0.4, 1.0), 3.5)
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
    return _LensGalaxy(z_lens, z_source, theta_e, sigma_v, log_mstar, log_mhalo, mag_lens, r_eff, lens_color)


def draw_mass(rng: np.random.Generator, theta_e: float):
    """SIE + external shear lenstronomy kwargs, the lens centre, and the light's axis ratio and angle
    (close to the mass's)."""
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
    return kwargs_lens, center, light_q, light_phi


def _draw_lensed_source(rng: np.random.Generator, theta_e: float, center) -> tuple[LightPart, int]:
    """A lens's source: its light part and catalogue ID."""
    mag_source = rng.uniform(23.0, 27.5)
    source_color = rng.normal(0.4, 0.25)  # blue: star-forming at z ~ 1-3
    source = _draw_source(rng, theta_e, center, mag_source)
    source_id = int(rng.integers(100_000, 1_000_000))
    return LightPart("source", source, mag_source, source_color), source_id


def _galaxy_parts(rng, kind, r_eff, q, phi, center, mag, color) -> Iterator[LightPart]:
    """The central galaxy's light: an elliptical; a bulge + disc with spiral arms and knots; or an
    elliptical with a (partial, knotty) star-forming ring."""
    if kind == "spiral":
        yield from spiral_parts(rng, center, mag, color)
        return
    yield LightPart("lens", Sersic(r_eff, rng.uniform(2.5, 5.5), q, phi, center), mag, color, core=0.5)
    if kind == "ring":
        yield from ring_parts(rng, q, phi, center, mag)


def spiral_parts(rng, center, mag, color) -> Iterator[LightPart]:
    """Bulge, disc, arms and knots on the arms, sharing the galaxy's magnitude ``mag``."""

    def share(fraction: float) -> float:
        return mag - 2.5 * math.log10(fraction)

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
    knots = knots_at(rng, knot_x, knot_y, n_knots)
    yield LightPart("lens", bulge, share(bulge_fraction), color, core=0.5)
    yield LightPart("lens", disc, share(1 - bulge_fraction - arm_fraction - knot_fraction), color - 0.4)
    yield LightPart("lens", arms, share(arm_fraction), rng.normal(0.6, 0.2))
    yield LightPart("lens", knots, share(knot_fraction), rng.normal(0.3, 0.2))


def ring_parts(rng, q, phi, center, mag) -> Iterator[LightPart]:
    """A star-forming ring (full, or an arc) around the elliptical, clumpy half of the time."""
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
        knots = knots_at(rng, *ring.on_ring(angles), n_knots)
        yield LightPart("lens", knots, ring_mag + rng.uniform(0.5, 1.5), ring_color - 0.2)


def knots_at(rng, x: np.ndarray, y: np.ndarray, n: int) -> Knots:
    fractions = tuple(rng.dirichlet(np.ones(n)))
    return Knots(tuple(zip(x.tolist(), y.tolist(), strict=False)), tuple(rng.uniform(0.03, 0.07, n)), fractions)


def companion(rng, mag_lens, lens_color, lens_center) -> tuple[LightPart, float]:
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
