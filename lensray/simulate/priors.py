"""The simulation presets' priors: every nuisance's distribution in one readable place.

``randomised`` (the default, for training) draws every nuisance from wide priors so that a network
cannot learn the simulator's habits: a PSF family and shape per band, a noise level and texture per
object, several lens-light profiles, source morphologies, and many kinds of confusers that are mixed
into lenses and non-lenses *at the same rates* (a lens is a galaxy of the same population with a
source behind it). ``shifted`` is a second, deliberately different set used only to evaluate: other
PSF families and levels, noisier data, another Einstein-radius and source population and another
confuser mix. ``classic`` is the original simulator (``scene.draw_scene``): Gaussian PSF, one noise
model, few confuser kinds; its constants live in ``instrument`` and ``scene`` and are not repeated here.

Ranges are (low, high) for a uniform draw unless a field says log-uniform. Each field's comment says why.
"""

from __future__ import annotations

from dataclasses import dataclass

Range = tuple[float, float]

# The confuser kinds (the truth file's ``kind``): the main feature an object has besides its central
# galaxy and, for a lens, its source. "plain" is a bare galaxy.
CONFUSER_KINDS: tuple[str, ...] = (
    "plain",
    "companions",
    "ring",
    "spiral",
    "merger",
    "edge_on",
    "blend",
    "star",
    "artefact",
)
ARTEFACT_KINDS: tuple[str, ...] = ("cosmic_ray", "satellite", "bad_column")
PSF_KINDS: tuple[str, ...] = ("gaussian", "moffat", "moffat_wings", "double_gaussian")


@dataclass(frozen=True)
class PsfPriors:
    kinds: dict[str, float]  # family -> probability (one family per object, shape drawn per band)
    fwhm: dict[str, Range]  # per band (arcsec): the object's seeing; bands share a quantile +- jitter
    band_jitter: float  # sd of each band's quantile around the object's: FWHMs correlate across bands, loosely
    moffat_beta: Range  # Moffat power: 2 (big wings, ground-like) .. 5 (near Gaussian)
    wing_fraction: Range  # flux in the broad halo of moffat_wings / double_gaussian (scattered light)
    wing_scale: Range  # halo FWHM / core FWHM
    ellipticity: Range  # 1 - axis ratio of the core (tracking errors, optics), random angle


@dataclass(frozen=True)
class NoisePriors:
    sky_scale: Range  # log-uniform x Euclid's nominal background sigma, per object: depth varies over a survey
    band_scale_jitter: float  # sd (dex) of each band's own factor: bands reach different depths
    exposure_scale: Range  # log-uniform x nominal exposure: the Poisson term's weight against the background
    gradient_rate: float  # objects with a sky-subtraction residual (a plane + pedestal)
    gradient: Range  # residual's amplitude across the stamp, in background sigmas
    correlated_rate: float  # bands whose noise is correlated, as after resampling / drizzling
    correlation: Range  # Gaussian smoothing sigma (pixels) of that noise; variance is kept


@dataclass(frozen=True)
class LensPriors:
    theta_e: Range  # Einstein radius (arcsec), log-uniform: sets mass, hence lens light, for both classes
    theta_e_log_normal: bool  # draw theta_E from a log-normal inside the range instead (the shifted population)
    z_lens: Range  # lens redshift
    sersic_n: Range  # the central elliptical's Sersic index: discy to cuspy
    two_component_rate: float  # core + envelope (two Sersics): no single profile shape per class
    disc_rate: float  # a faint exponential disc under the bulge (S0-like)
    color: tuple[float, float]  # VIS - H mean, sd: red old stars, with room for bluer ones
    mag_scatter: float  # sd (mag) around the mass-to-light relation


@dataclass(frozen=True)
class SourcePriors:
    mag: Range  # unlensed VIS magnitude: bright arcs to barely detectable ones
    color: tuple[float, float]  # VIS - H mean, sd: star-forming, but red sources exist (a colour is no label)
    r_eff_median: float  # arcsec at mag 24.5 (fainter sources are smaller)
    morphology: dict[str, float]  # smooth Sersic / clumpy (knots) / irregular (scattered blobs)
    second_source_rate: float  # another source behind the same lens (arcs in two places, other colour)
    inside_rate: float  # sources inside the tangential caustic (multiple images) vs outside (one image)
    offset_inside: Range  # offset / theta_E of sources inside
    offset_outside: Range  # offset / theta_E of sources outside: weakly lensed, still labelled by the paper rule


@dataclass(frozen=True)
class ConfuserPriors:
    kinds: dict[str, float]  # main confuser -> probability, the same for lenses and non-lenses
    extra_companion_rate: float  # companions on top of any main kind (real fields are crowded)
    extra_cosmic_ray_rate: float  # a cosmic ray on top of any main kind (VIS single exposures leak some)
    artefacts: dict[str, float]  # kind of artefact when the main kind is "artefact"
    star_mag: Range  # a foreground star's VIS magnitude: faint dots to saturated-looking spikes
    blend_separation: Range  # arcsec from the centre of an overlapping galaxy (another redshift)
    merger_separation: Range  # arcsec between the merging galaxies' centres
    tidal_radius: Range  # arcsec: tidal arcs at Einstein-radius-like distances, the classic false positive


@dataclass(frozen=True)
class Priors:
    name: str
    psf: PsfPriors
    noise: NoisePriors
    lens: LensPriors
    source: SourcePriors
    confusers: ConfuserPriors


RANDOMISED = Priors(
    name="randomised",
    psf=PsfPriors(
        kinds={"gaussian": 0.25, "moffat": 0.45, "moffat_wings": 0.30},
        fwhm={"VIS": (0.14, 0.24), "Y": (0.28, 0.50), "J": (0.30, 0.52), "H": (0.32, 0.55)},
        band_jitter=0.25,
        moffat_beta=(2.2, 5.0),
        wing_fraction=(0.03, 0.15),
        wing_scale=(2.5, 5.0),
        ellipticity=(0.0, 0.12),
    ),
    noise=NoisePriors(
        sky_scale=(0.6, 1.8),
        band_scale_jitter=0.08,
        exposure_scale=(0.3, 3.0),
        gradient_rate=0.3,
        gradient=(0.0, 1.5),
        correlated_rate=0.3,
        correlation=(0.4, 1.0),
    ),
    lens=LensPriors(
        theta_e=(0.3, 2.5),
        theta_e_log_normal=False,
        z_lens=(0.15, 1.0),
        sersic_n=(1.5, 6.0),
        two_component_rate=0.35,
        disc_rate=0.2,
        color=(1.5, 0.35),
        mag_scatter=0.35,
    ),
    source=SourcePriors(
        mag=(22.5, 27.5),
        color=(0.4, 0.45),
        r_eff_median=0.15,
        morphology={"smooth": 0.35, "clumpy": 0.4, "irregular": 0.25},
        second_source_rate=0.12,
        inside_rate=0.6,
        offset_inside=(0.02, 1.0),
        offset_outside=(1.0, 5.0),
    ),
    confusers=ConfuserPriors(
        kinds={
            "plain": 0.22,
            "companions": 0.16,
            "ring": 0.09,
            "spiral": 0.10,
            "merger": 0.09,
            "edge_on": 0.08,
            "blend": 0.10,
            "star": 0.08,
            "artefact": 0.08,
        },
        extra_companion_rate=0.25,
        extra_cosmic_ray_rate=0.05,
        artefacts={"cosmic_ray": 0.45, "satellite": 0.3, "bad_column": 0.25},
        star_mag=(17.5, 24.5),
        blend_separation=(0.2, 1.6),
        merger_separation=(0.6, 2.5),
        tidal_radius=(0.8, 3.0),
    ),
)

SHIFTED = Priors(
    name="shifted",
    psf=PsfPriors(
        kinds={"gaussian": 0.15, "moffat": 0.2, "moffat_wings": 0.3, "double_gaussian": 0.35},  # a family unseen
        fwhm={"VIS": (0.17, 0.28), "Y": (0.33, 0.58), "J": (0.35, 0.60), "H": (0.38, 0.62)},  # worse seeing
        band_jitter=0.15,
        moffat_beta=(1.8, 3.5),  # heavier wings
        wing_fraction=(0.08, 0.25),
        wing_scale=(2.0, 6.0),
        ellipticity=(0.03, 0.2),
    ),
    noise=NoisePriors(
        sky_scale=(0.9, 2.5),  # shallower data
        band_scale_jitter=0.15,
        exposure_scale=(0.2, 1.5),
        gradient_rate=0.5,
        gradient=(0.5, 3.0),
        correlated_rate=0.6,
        correlation=(0.6, 1.4),
    ),
    lens=LensPriors(
        theta_e=(0.4, 3.0),
        theta_e_log_normal=True,  # peaked near 1", not flat in log
        z_lens=(0.25, 1.2),
        sersic_n=(2.5, 8.0),  # cuspier ellipticals
        two_component_rate=0.5,
        disc_rate=0.3,
        color=(1.8, 0.4),
        mag_scatter=0.4,
    ),
    source=SourcePriors(
        mag=(23.0, 28.0),  # fainter
        color=(0.6, 0.5),
        r_eff_median=0.11,  # more compact
        morphology={"smooth": 0.2, "clumpy": 0.3, "irregular": 0.5},
        second_source_rate=0.2,
        inside_rate=0.7,
        offset_inside=(0.0, 0.9),
        offset_outside=(1.0, 3.0),
    ),
    confusers=ConfuserPriors(
        kinds={
            "plain": 0.15,
            "companions": 0.22,
            "ring": 0.14,
            "spiral": 0.06,
            "merger": 0.14,
            "edge_on": 0.05,
            "blend": 0.12,
            "star": 0.06,
            "artefact": 0.06,
        },
        extra_companion_rate=0.35,
        extra_cosmic_ray_rate=0.1,
        artefacts={"cosmic_ray": 0.3, "satellite": 0.4, "bad_column": 0.3},
        star_mag=(16.5, 23.5),
        blend_separation=(0.3, 2.0),
        merger_separation=(0.4, 2.0),
        tidal_radius=(0.6, 3.5),
    ),
)

PRESETS: dict[str, Priors] = {"randomised": RANDOMISED, "shifted": SHIFTED}


def priors_for(preset: str) -> Priors:
    """A preset's priors (``classic`` has none: it is ``scene.draw_scene``)."""
    return PRESETS[preset]
