"""Draw a scene from a preset's priors (``randomised``, ``shifted``): domain randomisation.

Every draw that does not depend on the class comes first and from the same priors for lenses and
non-lenses: the galaxy, its mass, the main confuser (plain, companions, ring, spiral, merger, edge-on
disc, blend, star, artefact), extra companions, the PSF and the noise. Only then does a lens draw its
source(s). So a confuser, a PSF shape or a noise level never tells the class; only the lensed light does.
The order of the draws is part of the output (see ``scene``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from lenstronomy.Cosmo.lens_cosmo import LensCosmo

from lensray.simulate.instrument import COSMOLOGY, BandNoise, Psf
from lensray.simulate.light import ClumpySource, Knots, LightPart, PointSource, Ring, Sersic
from lensray.simulate.priors import ConfuserPriors, LensPriors, NoisePriors, Priors, PsfPriors, SourcePriors
from lensray.simulate.scene import Scene, companion, draw_mass, ring_parts, spiral_parts
from lensray.sky.bands import BAND_NAMES


def _choice(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    weights = np.array([table[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))


def _mag_share(mag: float, fraction: float) -> float:
    return mag - 2.5 * math.log10(fraction)


def draw_random_scene(rng: np.random.Generator, is_lens: bool, priors: Priors) -> Scene:
    """All the physical and instrumental parameters of one object under ``priors``."""
    z_lens, z_source, theta_e, sigma_v, log_mstar, log_mhalo, mag, r_eff, color = _galaxy(rng, priors.lens)
    kwargs_lens, center, q, phi = draw_mass(rng, theta_e)
    confuser = _choice(rng, priors.confusers.kinds)
    morphology = confuser if confuser in ("spiral", "ring", "edge_on") else "elliptical"
    parts = list(_central(rng, morphology, priors.lens, r_eff, q, phi, center, mag, color))
    extra, radii = _confuser_parts(rng, confuser, priors.confusers, mag, color, r_eff, center)
    parts += extra
    artefacts = _artefacts(rng, confuser, priors.confusers)
    psf = _draw_psf(rng, priors.psf)
    depth = _log_uniform(rng, priors.noise.sky_scale)  # the object's depth; each band scatters around it
    noise = {band: _draw_noise(rng, priors.noise, depth) for band in BAND_NAMES}
    sources: list[LightPart] = []
    lens_type = "none"
    if is_lens:
        sources, strong = _sources(rng, priors.source, theta_e, center)
        lens_type = "strong" if strong else "weak"
    main = sources[0] if sources else None
    lens_mag = -2.5 * math.log10(sum(10 ** (-0.4 * p.mag_vis) for p in parts if p.group == "lens"))
    return Scene(
        kind=morphology,
        z_lens=z_lens,
        z_source=z_source if is_lens else 0.0,
        theta_e=theta_e,
        sigma_v=sigma_v,
        star_mass=10**log_mstar,
        halo_mass=10**log_mhalo,
        mag_lens=lens_mag,
        lens_vis_minus_h=color,
        kwargs_lens=kwargs_lens,
        parts=tuple(parts + sources),
        source=main.shape if main is not None else None,  # type: ignore[arg-type]
        source_id=int(rng.integers(100_000, 1_000_000)) if is_lens else 0,
        mag_source=main.mag_vis if main is not None else 0.0,
        source_vis_minus_h=main.vis_minus_h if main is not None else 0.0,
        companion_radii=tuple(radii),
        psf_fwhm={band: psf[band].fwhm for band in BAND_NAMES},
        preset=priors.name,
        psf=psf,
        noise=noise,
        confuser=confuser,
        lens_type=lens_type,
        extra_sources=max(0, len(sources) - 1),
        artefacts=artefacts,
    )


def _galaxy(rng: np.random.Generator, lp: LensPriors):
    """Redshifts and Einstein radius, then mass and light from scaling relations with scatter (as classic's
    ``scene._draw_galaxy``, with the preset's ranges and scatter)."""
    z_lens = rng.uniform(*lp.z_lens)
    z_source = rng.uniform(max(z_lens + 0.4, 1.0), 3.5)
    if lp.theta_e_log_normal:
        theta_e = float(np.clip(math.exp(rng.normal(math.log(1.0), 0.4)), *lp.theta_e))
    else:
        theta_e = _log_uniform(rng, lp.theta_e)
    sigma_v = float(LensCosmo(z_lens, z_source, COSMOLOGY).sis_theta_E2sigma_v(theta_e))
    log_mstar = 10.9 + (math.log10(sigma_v) - 2.21) / 0.286 + rng.normal(0.0, 0.1)
    log_mhalo = 13.0 + 1.8 * (log_mstar - 11.3) + rng.normal(0.0, 0.2)
    abs_mag = 4.65 - 2.5 * (log_mstar - math.log10(3.0))
    mag = abs_mag + float(COSMOLOGY.distmod(z_lens).value) + 1.0 * z_lens + rng.normal(0.0, lp.mag_scatter)
    kpc_per_arcsec = float(COSMOLOGY.angular_diameter_distance(z_lens).value) * 1e3 / 206264.8
    r_eff = float(np.clip(10 ** (0.7 + 0.56 * (log_mstar - 11.0) + rng.normal(0.0, 0.15)) / kpc_per_arcsec, 0.2, 3.0))
    color = rng.normal(lp.color[0] + 0.5 * (z_lens - 0.5), lp.color[1])
    return z_lens, z_source, theta_e, sigma_v, log_mstar, log_mhalo, mag, r_eff, color


def _central(rng, morphology: str, lp: LensPriors, r_eff, q, phi, center, mag, color) -> Iterator[LightPart]:
    """The central galaxy's light: an elliptical of one or two Sersics (+ a faint disc), a spiral, an
    elliptical with a star-forming ring, or an edge-on disc with a bulge."""
    if morphology == "spiral":
        yield from spiral_parts(rng, center, mag, color)
        return
    if morphology == "edge_on":
        bulge = rng.uniform(0.1, 0.5)
        disc_q, disc_phi = rng.uniform(0.08, 0.25), rng.uniform(0.0, math.pi)
        disc = Sersic(r_eff * rng.uniform(1.0, 2.5), rng.uniform(0.7, 1.3), disc_q, disc_phi, center)
        core = Sersic(r_eff * rng.uniform(0.2, 0.5), rng.uniform(1.0, 4.0), rng.uniform(0.6, 1.0), disc_phi, center)
        yield LightPart("lens", core, _mag_share(mag, bulge), color, core=0.5)
        yield LightPart("lens", disc, _mag_share(mag, 1 - bulge), color - rng.uniform(0.0, 0.8), core=0.5)
        return
    disc = rng.uniform(0.1, 0.35) if rng.random() < lp.disc_rate else 0.0
    if rng.random() < lp.two_component_rate:
        inner = rng.uniform(0.2, 0.5) * (1 - disc)
        core = Sersic(r_eff * rng.uniform(0.15, 0.5), rng.uniform(1.0, 4.0), q, phi, center)
        yield LightPart("lens", core, _mag_share(mag, inner), color, core=0.5)
        envelope_q = float(np.clip(q + rng.normal(0.0, 0.1), 0.35, 1.0))
        envelope = Sersic(r_eff * rng.uniform(1.2, 2.5), rng.uniform(*lp.sersic_n), envelope_q, phi, center)
        yield LightPart("lens", envelope, _mag_share(mag, 1 - disc - inner), color + rng.normal(0.0, 0.1), core=0.5)
    else:
        yield LightPart(
            "lens", Sersic(r_eff, rng.uniform(*lp.sersic_n), q, phi, center), _mag_share(mag, 1 - disc), color, core=0.5
        )
    if disc:
        shape = Sersic(r_eff * rng.uniform(1.5, 3.0), 1.0, rng.uniform(0.3, 1.0), phi + rng.normal(0.0, 0.2), center)
        yield LightPart("lens", shape, _mag_share(mag, disc), color - rng.uniform(0.2, 0.8))
    if morphology == "ring":
        yield from ring_parts(rng, q, phi, center, mag)


def _offset(rng, center, separation: tuple[float, float]) -> tuple[tuple[float, float], float]:
    radius, angle = rng.uniform(*separation), rng.uniform(0.0, 2 * math.pi)
    return (center[0] + radius * math.cos(angle), center[1] + radius * math.sin(angle)), radius


def _galaxy_part(rng, center, mag, color, r_eff_range) -> LightPart:
    r_eff = _log_uniform(rng, r_eff_range)
    shape = Sersic(r_eff, rng.uniform(0.8, 4.0), rng.uniform(0.3, 1.0), rng.uniform(0.0, math.pi), center)
    return LightPart("companion", shape, mag, color, window=max(1.5, 10 * r_eff), core=4 * r_eff + 0.15)


def _confuser_parts(rng, confuser: str, cp: ConfuserPriors, mag, color, r_eff, center):
    """The main confuser's light (beyond the central galaxy) and extra companions; returns the parts and
    the distances of companion galaxies (the catalogue's n_gal_*)."""
    parts: list[LightPart] = []
    radii: list[float] = []
    if confuser == "merger":
        partner_center, radius = _offset(rng, center, cp.merger_separation)
        parts.append(
            _galaxy_part(rng, partner_center, mag + rng.uniform(0.0, 1.5), color + rng.normal(0, 0.2), (0.2, 1.0))
        )
        radii.append(radius)
        middle = ((center[0] + partner_center[0]) / 2, (center[1] + partner_center[1]) / 2)
        for _ in range(int(rng.integers(1, 3))):  # tidal arcs and tails: curved, faint, lens-like
            arc = Ring(
                middle,
                rng.uniform(*cp.tidal_radius),
                rng.uniform(0.06, 0.25),
                rng.uniform(0.4, 1.0),
                rng.uniform(0.0, math.pi),
                rng.uniform(2.0, 8.0),
                rng.uniform(0.0, 2 * math.pi),
            )
            arc_color = color + rng.normal(0.0, 0.3) if rng.random() < 0.5 else rng.normal(0.5, 0.3)
            parts.append(LightPart("companion", arc, mag + rng.uniform(1.5, 3.5), arc_color))
    elif confuser == "blend":
        blend_center, radius = _offset(rng, center, cp.blend_separation)
        blend_color = rng.normal(0.5, 0.3) if rng.random() < 0.5 else rng.normal(1.8, 0.3)
        parts.append(_galaxy_part(rng, blend_center, mag + rng.uniform(-0.3, 2.0), blend_color, (0.1, 0.8)))
        radii.append(radius)
    elif confuser == "star":
        star_center, _ = _offset(rng, center, (0.3, 7.0))
        parts.append(LightPart("companion", PointSource(star_center), rng.uniform(*cp.star_mag), rng.normal(0.3, 0.6)))
    n_companions = 1 + rng.poisson(1.5) if confuser == "companions" else 0
    if rng.random() < cp.extra_companion_rate:
        n_companions += 1 + rng.poisson(0.5)
    for _ in range(n_companions):
        part, radius = companion(rng, mag, color, center)
        parts.append(part)
        radii.append(radius)
    return parts, radii


def _artefacts(rng, confuser: str, cp: ConfuserPriors) -> tuple[str, ...]:
    kinds = [_choice(rng, cp.artefacts) for _ in range(int(rng.integers(1, 3)))] if confuser == "artefact" else []
    if rng.random() < cp.extra_cosmic_ray_rate:
        kinds.append("cosmic_ray")
    return tuple(kinds)


def _draw_psf(rng: np.random.Generator, pp: PsfPriors) -> dict[str, Psf]:
    """One PSF family per object; each band's FWHM at the object's seeing quantile +- jitter."""
    kind = _choice(rng, pp.kinds)
    quantile = rng.random()
    beta, fraction, scale = rng.uniform(*pp.moffat_beta), rng.uniform(*pp.wing_fraction), rng.uniform(*pp.wing_scale)
    phi = rng.uniform(0.0, math.pi)
    psf = {}
    for band in BAND_NAMES:
        low, high = pp.fwhm[band]
        u = float(np.clip(quantile + rng.normal(0.0, pp.band_jitter), 0.0, 1.0))
        winged = kind in ("moffat_wings", "double_gaussian")
        psf[band] = Psf(
            kind,
            low + u * (high - low),
            beta=beta if kind.startswith("moffat") else 0.0,
            wing_fraction=fraction if winged else 0.0,
            wing_scale=scale if winged else 1.0,
            q=1.0 - rng.uniform(*pp.ellipticity),
            phi=phi + rng.normal(0.0, 0.2),
        )
    return psf


def _draw_noise(rng: np.random.Generator, npri: NoisePriors, base: float) -> BandNoise:
    """One band's noise around the object's depth ``base``: level, Poisson weight, residual, correlation."""
    gradient = (0.0, 0.0, 0.0)
    if rng.random() < npri.gradient_rate:
        amplitude, angle = rng.uniform(*npri.gradient), rng.uniform(0.0, 2 * math.pi)
        gradient = (rng.normal(0.0, amplitude / 2), amplitude * math.cos(angle), amplitude * math.sin(angle))
    correlation = rng.uniform(*npri.correlation) if rng.random() < npri.correlated_rate else 0.0
    return BandNoise(
        sky_scale=base * 10 ** rng.normal(0.0, npri.band_scale_jitter),
        exposure_scale=_log_uniform(rng, npri.exposure_scale),
        gradient=gradient,
        correlation=correlation,
    )


def _sources(rng, sp: SourcePriors, theta_e: float, center) -> tuple[list[LightPart], bool]:
    """A lens's source(s): the main one, sometimes a second; and whether the main one sits inside the
    caustic's scale (offset < theta_E: multiple images, strong) or outside (weak)."""
    strong = rng.random() < sp.inside_rate
    sources = [_source(rng, sp, theta_e, center, strong)]
    if rng.random() < sp.second_source_rate:
        sources.append(_source(rng, sp, theta_e, center, rng.random() < sp.inside_rate))
    return sources, strong


def _source(rng, sp: SourcePriors, theta_e: float, lens_center, inside: bool) -> LightPart:
    mag = rng.uniform(*sp.mag)
    color = rng.normal(*sp.color)
    r_eff = float(np.clip(10 ** rng.normal(math.log10(sp.r_eff_median) - 0.08 * (mag - 24.5), 0.18), 0.04, 0.6))
    offset = rng.uniform(*(sp.offset_inside if inside else sp.offset_outside))
    offset = max(0.0, min(offset * theta_e, 9.0 - theta_e - 4 * r_eff))  # the lensed light stays in the stamp
    angle = rng.uniform(0.0, 2 * math.pi)
    center = (lens_center[0] + offset * math.cos(angle), lens_center[1] + offset * math.sin(angle))
    morphology = _choice(rng, sp.morphology)
    n_index = rng.uniform(0.5, 1.2) if morphology == "irregular" else rng.uniform(0.7, 2.5)
    body = Sersic(r_eff, n_index, rng.uniform(0.3, 1.0), rng.uniform(0.0, math.pi), center)
    if morphology == "smooth":
        return LightPart("source", ClumpySource(body), mag, color)
    # clumpy: a few knots on the body; irregular: many, spread wide, carrying most of the light
    n_knots, spread, share = (
        (int(rng.integers(1, 5)), 1.2, rng.uniform(0.2, 0.5))
        if morphology == "clumpy"
        else (int(rng.integers(3, 9)), 2.5, rng.uniform(0.4, 0.8))
    )
    offsets = rng.normal(0.0, spread * r_eff, size=(n_knots, 2))
    knots = Knots(
        tuple((center[0] + dx, center[1] + dy) for dx, dy in offsets.tolist()),
        tuple(rng.uniform(0.02, 0.06, n_knots)),
        tuple(rng.dirichlet(np.ones(n_knots)) * share),
    )
    return LightPart("source", ClumpySource(body, knots), mag, color)
