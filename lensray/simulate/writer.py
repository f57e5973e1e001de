"""Challenge-format simulated data sets: lenstronomy scenes -> four-band FITS cutouts + the catalogue.

Per object (pure, no I/O; ``simulate_object``): draw a scene (``scene``: lens galaxy mass and light,
an optional lensed source, companions, spiral or ring structure) -> render each light component once
on a 0.1"/px canvas, then per band: colours, Gaussian PSF, the band's pixel grid, noise (``render``)
-> measure the catalogue quantities (``measure``) -> inject the real data's image quirks (``quirks``:
NaN pixels, off-size NIR stamps; artefacts). The scene comes from ``scene.draw_scene`` under the
``classic`` preset, else from ``randomise.draw_random_scene`` with the preset's ``priors``. The driver (``simulate_dataset``) plans the data set (which IDs are
lenses, which rows lose their images or repeat), fans chunks of IDs out to Ray tasks that write the
FITS files, and writes the catalogue and each object's truth (``truth.csv``) from the rows they send back.

Every object's randomness comes from ``SeedSequence(seed, spawn_key=(1, ID))``, so the output depends
on the seed and the ID only, never on the number of workers or the chunking.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from lensray import storage
from lensray.config import SimulateConfig
from lensray.errors import ConfigError
from lensray.profiles import SurveyProfile
from lensray.runtime import ensure_ray, progress
from lensray.simulate.instrument import FLUX_MAGZP, band_observation
from lensray.simulate.layout import file_layout, object_files
from lensray.simulate.measure import FIELD_DESCRIPTIONS, measure
from lensray.simulate.priors import priors_for
from lensray.simulate.quirks import ImageQuirks, draw_nir_sizes, inject_artefacts, inject_nan_pixels
from lensray.simulate.randomise import draw_random_scene
from lensray.simulate.render import observe, render_scene, vis_group_maps
from lensray.simulate.scene import Scene, draw_scene
from lensray.simulate.survey import SurveyBand, is_challenge, object_coordinates, observe_survey, survey_bands
from lensray.sky.bands import BAND_NAMES, BANDS, band_relpath
from lensray.sky.catalog import CATALOG_NAME, COLUMNS, INT_COLUMNS

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
    scene: Scene | None = None  # what was drawn: the truth file's source
    # A survey profile's extras (``--profile``): per-band noise variance and the object's (RA, Dec) in deg.
    variances: dict[str, np.ndarray] = field(default_factory=dict)
    coords: tuple[float, float] | None = None


TRUTH_NAME = "truth.csv"  # beside the catalogue: each object's truth (README "Simulation")
TRUTH_COLUMNS: tuple[str, ...] = (
    "ID",
    "is_lens",
    "kind",  # the main confuser (priors.CONFUSER_KINDS); classic: plain, companions, spiral or ring
    "lens_type",  # none, strong (source offset < theta_E) or weak
    "galaxy",  # the central galaxy's morphology: elliptical, spiral, ring, edge_on
    "preset",
    "theta_e",
    "z_lens",
    "mag_lens",
    "mag_source",
    "mag_eff",
    "n_sources",
    "n_companions",
    "psf_kind",
    "psf_fwhm_VIS",
    "psf_fwhm_Y",
    "psf_fwhm_J",
    "psf_fwhm_H",
    "noise_scale_VIS",
    "noise_scale_H",
    "correlated_bands",  # bands whose noise is correlated
    "sky_residual_bands",  # bands with a sky-subtraction residual
    "artefacts",  # ;-joined priors.ARTEFACT_KINDS, or none
    "nan_pixels",
    "offsize_nir",  # band:side of an off-size NIR stamp, or none
    "has_images",  # false: a catalogue row without image files
)


def object_rng(seed: int, object_id: int) -> np.random.Generator:
    """The random stream of one ID: independent of every other ID, of chunking and of workers."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, int(object_id))))


def simulate_object(
    object_id: int,
    is_lens: bool,
    rng: np.random.Generator,
    config: SimulateConfig,
    profile: SurveyProfile | None = None,
) -> SimulatedObject:
    """Draw, render, observe and measure one object; inject its image quirks. Pure: no I/O.
    ``profile``: a survey profile's bands (None or euclid_challenge: the challenge's four bands)."""
    # The fourth stream (artefacts) is new; spawning it leaves the first three, hence classic, unchanged.
    scene_rng, noise_rng, quirk_rng, artefact_rng = rng.spawn(4)
    if config.preset == "classic":
        scene = draw_scene(scene_rng, is_lens, config)
    else:
        scene = draw_random_scene(scene_rng, is_lens, priors_for(config.preset))
    if not is_challenge(profile):
        assert profile is not None
        streams = (noise_rng, quirk_rng, artefact_rng)
        return _observe_in_profile(object_id, is_lens, scene, streams, config, profile)
    nir_sizes = draw_nir_sizes(quirk_rng, config)
    rendered = render_scene(scene)
    # One noise stream per band: an off-size band leaves the others' noise alone.
    band_rngs = dict(zip(BAND_NAMES, noise_rng.spawn(len(BAND_NAMES)), strict=False))
    images, vis_groups = observe(scene, rendered, band_rngs, nir_sizes)
    row = measure(object_id, scene, rendered, vis_groups)
    if scene.artefacts:
        inject_artefacts(images, scene.artefacts, {b: _sky_sigma(scene, b) for b in BAND_NAMES}, artefact_rng)
    nan_pixels = inject_nan_pixels(images, quirk_rng, config)
    quirks = ImageQuirks(nir_sizes, nan_pixels)
    return SimulatedObject(int(object_id), bool(is_lens), scene.kind, images, row, quirks, scene.psf_fwhm, scene)


def _observe_in_profile(
    object_id: int,
    is_lens: bool,
    scene: Scene,
    streams: tuple[np.random.Generator, ...],
    config: SimulateConfig,
    profile: SurveyProfile,
) -> SimulatedObject:
    """The scene in a survey profile's bands (``survey``); the catalogue row is still measured in VIS,
    for the truth file. Quirks: NaN pixels and artefacts in the profile's bands; no off-size stamps."""
    noise_rng, quirk_rng, artefact_rng = streams
    bands = survey_bands(profile)
    names = [band.name for band in bands]
    rendered = render_scene(scene)
    # One noise stream per band position: the k-th band's noise does not depend on how many bands follow.
    observed = observe_survey(scene, rendered, bands, noise_rng.spawn(len(bands)))
    row = measure(object_id, scene, rendered, vis_group_maps(scene, rendered))
    images = observed.images
    if scene.artefacts:
        sigmas = {band.name: band.sky_sigma(scene) for band in bands}
        inject_artefacts(images, scene.artefacts, sigmas, artefact_rng, bands=names, sharpest=profile.reference)
    nan_pixels = inject_nan_pixels(images, quirk_rng, config, names)
    coords = object_coordinates(config.seed, object_id)
    quirks = ImageQuirks({}, nan_pixels)
    return SimulatedObject(
        int(object_id),
        bool(is_lens),
        scene.kind,
        images,
        row,
        quirks,
        scene.psf_fwhm,
        scene,
        observed.variances,
        coords,
    )


def _sky_sigma(scene: Scene | None, band: str) -> float:
    """The band's background sigma per pixel (flux units) for this object."""
    obs = band_observation(band)
    scale = 1.0 if scene is None or scene.noise is None else scene.noise[band].sky_scale
    return obs.noise_cps * scale * obs.flux_per_cps


def truth_row(obj: SimulatedObject, has_images: bool = True) -> dict[str, object]:
    """What the object is (``TRUTH_COLUMNS``): the class, the kind of confuser, the lens and the instrument."""
    scene, row = obj.scene, obj.row
    assert scene is not None
    kind = scene.confuser or (
        scene.kind if scene.kind != "elliptical" else "companions" if scene.companion_radii else "plain"
    )
    lens_type = scene.lens_type
    if scene.preset == "classic" and scene.source is not None:
        lens = scene.kwargs_lens[0]
        offset = math.hypot(scene.source.center[0] - lens["center_x"], scene.source.center[1] - lens["center_y"])
        lens_type = "strong" if offset < scene.theta_e else "weak"
    noise = scene.noise or {}
    return dict(
        ID=obj.object_id,
        is_lens=int(obj.is_lens),
        kind=kind,
        lens_type=lens_type,
        galaxy=scene.kind,
        preset=scene.preset,
        theta_e=scene.theta_e,
        z_lens=scene.z_lens,
        mag_lens=row["mag_lens"],
        mag_source=row["mag_source"],
        mag_eff=row["mag_eff"],
        n_sources=int(row["n_sources"]),
        n_companions=len(scene.companion_radii),
        psf_kind=scene.psf["VIS"].kind if scene.psf else "gaussian",
        **{f"psf_fwhm_{band}": scene.psf_fwhm[band] for band in BAND_NAMES},
        noise_scale_VIS=noise["VIS"].sky_scale if noise else 1.0,
        noise_scale_H=noise["H"].sky_scale if noise else 1.0,
        correlated_bands=sum(n.correlation > 0 for n in noise.values()),
        sky_residual_bands=sum(any(n.gradient) for n in noise.values()),
        artefacts=";".join(scene.artefacts) or "none",
        nan_pixels=sum(obj.quirks.nan_pixels.values()),
        offsize_nir=";".join(f"{b}:{s}" for b, s in obj.quirks.nir_sizes.items()) or "none",
        has_images=int(has_images),
    )


def fits_bytes(obj: SimulatedObject, band: str, seed: int) -> bytes:
    """One band's FITS file: the image as the primary HDU, units and observing facts in the header."""
    obs = band_observation(band)
    header = fits.Header()
    header["BAND"] = (band, "Euclid-like band")
    header["ID"] = (obj.object_id, "object identifier")
    header["PIXSCALE"] = (BANDS[band].pixel_scale, "arcsec per pixel")
    header["BUNIT"] = ("flux", "AB mag = -2.5 log10(flux) + MAGZP")
    header["MAGZP"] = (FLUX_MAGZP, "AB magnitude of unit flux")
    psf = obj.scene.psf if obj.scene is not None else None
    if psf is None:  # classic: byte for byte as before
        header["PSF_FWHM"] = (round(obj.psf_fwhm[band], 4), "Gaussian PSF FWHM (arcsec)")
    else:
        header["PSF_FWHM"] = (round(obj.psf_fwhm[band], 4), "PSF FWHM (arcsec)")
        header["PSFKIND"] = (psf[band].kind, "PSF family (lensray simulate priors)")
    sky_sigma = _sky_sigma(obj.scene, band)
    header["SKYSIG"] = (float(f"{sky_sigma:.4e}"), "background noise sigma per pixel (flux)")
    header["EXPTIME"] = (round(obs.exposure_time, 1), "total exposure time (s)")
    header["ORIGIN"] = ("lensray.simulate", "lenstronomy-based challenge-format simulation")
    header["SIMSEED"] = (int(seed), "simulation seed")
    buffer = io.BytesIO()
    # The header is built here from fixed keys: astropy's output verification would only cost time.
    fits.PrimaryHDU(data=obj.images[band], header=header).writeto(buffer, output_verify="ignore")
    return buffer.getvalue()


def write_object(obj: SimulatedObject, out: str, seed: int, profile: SurveyProfile | None = None) -> None:
    """Write the object's FITS files under the data set root ``out``: the challenge's four, or the profile's."""
    if not is_challenge(profile):
        assert profile is not None and obj.coords is not None
        bands = survey_bands(profile)
        files = object_files(profile, bands, obj.object_id, obj.images, obj.variances, obj.coords, obj.scene, seed)
        for relpath, data in files.items():
            storage.write_bytes(storage.join(out, relpath), data)
        return
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
    row: dict[str, float]  # the catalogue's: the challenge's 26 columns, or a survey profile's (survey_row)
    quirks: ImageQuirks
    truth: dict[str, object]


def simulate_chunk(
    plans: Sequence[ObjectPlan], config: SimulateConfig, profile: SurveyProfile | None = None
) -> list[ObjectResult]:
    """Simulate a chunk of IDs and write their images (unless planned missing)."""
    assert config.out is not None
    results = []
    for plan in plans:
        obj = simulate_object(plan.object_id, plan.is_lens, object_rng(config.seed, plan.object_id), config, profile)
        if not plan.missing_images:
            write_object(obj, config.out, config.seed, profile)
        row = obj.row if is_challenge(profile) else survey_row(obj, survey_bands(profile))  # type: ignore[arg-type]
        results.append(ObjectResult(plan, obj.kind, row, obj.quirks, truth_row(obj, not plan.missing_images)))
    return results


@dataclass(frozen=True)
class SimulationSummary:
    out: str
    catalog_url: str
    truth_url: str
    preset: str
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
                f"simulated {self.n_objects} objects ({self.n_lenses} lenses) -> {self.out}, preset {self.preset}",
                f"  catalogue: {self.catalog_url} ({self.n_rows} rows); truth: {self.truth_url}",
                f"  quirks: NaN pixels {ids(self.nan_pixel_ids)}; off-size NIR {ids(self.offsize_nir_ids)}; "
                f"rows without images {ids(self.missing_image_ids)}; duplicate ID rows {ids(self.duplicate_ids)}",
                f"  {self.wall_s:.1f} s on {self.workers} worker(s): {self.objects_per_s:.1f} objects/s",
            ]
        )


def simulate_dataset(config: SimulateConfig, profile: SurveyProfile | None = None) -> SimulationSummary:
    """Write a data set under ``config.out``: FITS files per ID in the profile's layout (None or
    euclid_challenge: the challenge's), then the catalogue (``catalog_text`` / ``survey_catalog_bytes``)."""
    import ray

    if config.out is None:
        raise ConfigError("simulate.out is not set: give the data set's root URL (a path or s3://bucket/prefix)")
    challenge = is_challenge(profile)
    if not challenge:  # refuse what cannot be written before any work starts
        assert profile is not None
        survey_bands(profile)
        file_layout(profile)
    start = time.perf_counter()
    storage.check_reachable(config.out, must_exist=False)
    plans = plan_dataset(config)
    ensure_ray()
    workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    results = sorted(_run_chunks(plans, config, workers, profile), key=lambda r: r.plan.object_id)
    rows = [r.row for r in results] + [r.row for r in results if r.plan.duplicated]
    catalog_url = storage.join(config.out, CATALOG_NAME if challenge else SURVEY_CATALOG_NAME)
    storage.write_bytes(catalog_url, catalog_text(rows, config).encode() if challenge else survey_catalog_bytes(rows))
    truth_url = storage.join(config.out, TRUTH_NAME)
    storage.write_bytes(truth_url, truth_text([r.truth for r in results]).encode())
    return SimulationSummary(
        out=config.out,
        catalog_url=catalog_url,
        truth_url=truth_url,
        preset=config.preset if challenge else f"{config.preset}, profile {profile.name}",  # type: ignore[union-attr]
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


def _run_chunks(
    plans: Sequence[ObjectPlan], config: SimulateConfig, workers: int, profile: SurveyProfile | None
) -> list[ObjectResult]:
    """Simulate every planned object in Ray tasks over chunks of IDs, at most ``workers`` at a time."""
    import ray

    chunk = max(1, min(32, math.ceil(len(plans) / (4 * workers))))  # several chunks per worker: load balance
    pending = [plans[k : k + chunk] for k in range(0, len(plans), chunk)]
    remote = ray.remote(num_cpus=1)(simulate_chunk)
    results: list[ObjectResult] = []
    in_flight: list = []
    with progress(len(plans), "simulate", "obj") as bar:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                in_flight.append(remote.remote(pending.pop(0), config, profile))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            for chunk_results in ray.get(done):
                results.extend(chunk_results)
                bar.update(len(chunk_results))
    return results


def catalog_text(rows: Sequence[dict[str, float]], config: SimulateConfig) -> str:
    """The challenge's CSV: a ``#`` comment block describing every field, a header row whose first
    (row index) column is unnamed, then one row per entry."""
    lines = [
        "# lensray simulated Bologna Lens Finding Challenge 2.0-format training catalogue",
        f"# seed={config.seed} n={config.n} first_id={config.first_id} lens_fraction={config.lens_fraction}"
        + ("" if config.preset == "classic" else f" preset={config.preset}"),
        "# The first column is an unnamed row index. Fields:",
        *(f"#   {name}: {FIELD_DESCRIPTIONS[name]}" for name in COLUMNS),
        "," + ",".join(COLUMNS),
    ]
    for index, row in enumerate(rows):
        lines.append(",".join([str(index), *(_format_value(name, row[name]) for name in COLUMNS)]))
    return "\n".join(lines) + "\n"


SURVEY_CATALOG_NAME = "catalog.parquet"  # a survey profile's catalogue, beside truth.csv


def survey_row(obj: SimulatedObject, bands: Sequence[SurveyBand]) -> dict[str, object]:
    """A survey profile's catalogue row: ID, ra, dec (deg), is_lens, and the central galaxy's AB magnitude
    ``mag_<band>`` in each band (its model magnitude, as a survey's photometry would give it)."""
    assert obj.coords is not None and obj.scene is not None
    row: dict[str, object] = dict(ID=obj.object_id, ra=obj.coords[0], dec=obj.coords[1], is_lens=obj.is_lens)
    lens = [part for part in obj.scene.parts if part.group == "lens"]
    for band in bands:
        row[f"mag_{band.name}"] = -2.5 * math.log10(sum(10 ** (-0.4 * band.magnitude(p)) for p in lens))
    return row


def survey_catalog_bytes(rows: Sequence[dict[str, object]]) -> bytes:
    """``catalog.parquet``: one row per catalogue entry (duplicated IDs repeat), columns ``ID`` (int64),
    ``ra``, ``dec`` (float64, deg, ICRS), ``is_lens`` (bool), ``mag_<band>`` (float32, AB). Ingest it with
    ``lensray preprocess --catalog .../catalog.parquet --label-column is_lens --coord-columns ra,dec``."""
    import tempfile

    import astropy.units as u
    from astropy.table import Table

    names = list(rows[0]) if rows else ["ID", "ra", "dec", "is_lens"]
    columns = {name: [row[name] for row in rows] for name in names}
    table = Table()
    table["ID"] = np.asarray(columns.pop("ID"), dtype=np.int64)
    table["ra"] = np.asarray(columns.pop("ra"), dtype=np.float64) * u.deg
    table["dec"] = np.asarray(columns.pop("dec"), dtype=np.float64) * u.deg
    table["is_lens"] = np.asarray(columns.pop("is_lens"), dtype=bool)
    for name, values in columns.items():
        table[name] = np.asarray(values, dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:  # astropy writes Parquet to a path only
        path = f"{folder}/{SURVEY_CATALOG_NAME}"
        table.write(path, format="parquet")
        with open(path, "rb") as file:
            return file.read()


def truth_text(rows: Sequence[dict[str, object]]) -> str:
    """``truth.csv``: a header row of ``TRUTH_COLUMNS``, then one row per object (no duplicates)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TRUTH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def _format_value(name: str, value: float) -> str:
    if name in INT_COLUMNS:
        return str(int(value))
    return f"{float(value):.7g}"
