"""Scoring whole catalogues of raw cutouts (``inference.predict_tta`` turns the images into scores).

``score_catalog`` scores every ID of a catalogue straight from the raw FITS cutouts with Ray
Data: CPU tasks read and preprocess batches of cutouts (exactly the transform the network was trained
on, as recorded in its checkpoint), an actor pool holding the network (one GPU each when the cluster
has GPUs) predicts, and the driver ranks the scores. A cutout that cannot be read or preprocessed is
listed with its reason in the rejects file, never scored (a zero image would get a real-looking score).

``prepare_scoring`` checks the inputs, ``compute_scores`` returns a ``ScoreResult`` (ranked candidates,
rejects, the gallery's images, timings) and ``write_scores`` writes the files; ``score_catalog`` does all three.
The catalogue is any table ``sky.catalog.load_catalog`` reads (CSV, FITS, ECSV, Parquet; the ID column
``DataConfig.id_column``); candidates carry its ``coord_columns`` as ``ra``/``dec`` and its ``keep_columns``.

An ensemble (``ensemble.EnsembleSpec``) scores like a run: each actor holds every member, each cutout is read
and preprocessed once for all of them, the score is the members' mean and ``score_std`` their spread.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lensray import storage
from lensray.config import DataConfig, PreprocessConfig
from lensray.errors import CatalogError, ScoreError
from lensray.evaluate.ensemble import EnsembleSpec, load_model
from lensray.evaluate.inference import check_tta, checkpoint_input, predict_scored
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile
from lensray.runs import ModelInput
from lensray.runtime import ensure_ray, progress
from lensray.sky.symmetry import D4_ELEMENTS

DEFAULT_BATCH = 64
DEFAULT_GALLERY = 24


# --- catalogue IDs --------------------------------------------------------------------------------


def read_catalog_columns(url: str, data: DataConfig | None = None) -> tuple[np.ndarray, list[int], pd.DataFrame]:
    """``(unique IDs in file order, repeated IDs, candidate columns)`` of a catalogue: the challenge CSV or
    any CSV/FITS/ECSV/Parquet table with ``data.id_column`` (default ``ID``; ``#`` comments allowed in CSV)
    -- a survey list needs no labels. The candidate columns are ``id``, ``ra``/``dec`` (with
    ``data.coord_columns``) and ``data.keep_columns``, one row per unique ID."""
    from lensray.sky.catalog import load_catalog

    try:
        catalog = load_catalog(url, data or DataConfig())
    except CatalogError as exc:
        raise ScoreError(str(exc)) from None
    return catalog.ids, sorted({d.object_id for d in catalog.duplicates}), catalog.candidate_columns()


def read_ids(url: str, data: DataConfig | None = None) -> tuple[np.ndarray, list[int]]:
    """``(unique IDs in file order, repeated IDs)`` of a catalogue (see ``read_catalog_columns``)."""
    ids, repeated, _ = read_catalog_columns(url, data)
    return ids, repeated


# --- Ray Data stages ------------------------------------------------------------------------------


def prepare_batch(
    batch: dict[str, np.ndarray],
    images_url: str,
    bands: Sequence[str],
    preprocess: PreprocessConfig,
    nan_policy: str,
    profile: SurveyProfile | None = None,
) -> dict[str, np.ndarray]:
    """CPU stage: read and preprocess a batch of IDs exactly as the ingest does (the same reader and
    ``preprocess_cutouts``, so the same rejects and reasons). Rejected IDs keep a NaN image and their reason."""
    from lensray.ingest.preprocess import output_shape, preprocess_cutouts
    from lensray.sky.fits import read_cutouts

    ids = np.asarray(batch["id"], dtype=np.int64)
    size = output_shape(preprocess, profile)[0]
    images = np.full((len(ids), len(bands), size, size), np.nan, dtype=np.float32)
    reasons = np.full(len(ids), "", dtype=object)
    messages = np.full(len(ids), "", dtype=object)
    cutouts, unread = read_cutouts(images_url, ids.tolist(), bands, nan_policy, profile=profile)
    prepared = preprocess_cutouts(cutouts, preprocess, bands, profile=profile)
    position = {int(object_id): k for k, object_id in enumerate(ids)}
    for cutout, image, accepted in zip(cutouts, prepared.images, prepared.accepted, strict=True):
        if accepted:
            images[position[cutout.object_id]] = image
    for reject in [*unread, *prepared.rejects]:
        reasons[position[reject.object_id]], messages[position[reject.object_id]] = reject.reason, reject.message
    return {"id": ids, "image": images, "reason": reasons.astype(str), "message": messages.astype(str)}


def score_prepared(
    run: Any, prepared: dict[str, np.ndarray], tta: str | None, batch_size: int
) -> dict[str, np.ndarray]:
    """The scores of a prepared batch (``prepare_batch``'s dict): its accepted images through ``predict_scored``,
    NaN for the rejects, which keep their reason and message; with ``tta`` also the 8 per-view scores; for an
    ensemble also ``score_std``, the spread over its members."""
    ok = prepared["reason"] == ""
    n = len(prepared["id"])
    scores, spread = np.full(n, np.nan), np.full(n, np.nan)
    per_transform = np.full((n, D4_ELEMENTS), np.nan)
    if ok.any():
        scored = predict_scored(run, np.asarray(prepared["image"])[ok], tta, batch_size=batch_size)
        scores[ok] = scored.scores
        if scored.per_transform is not None:
            per_transform[ok] = scored.per_transform
        if scored.members is not None:
            spread[ok] = scored.spread
    out = {"id": np.asarray(prepared["id"], np.int64), "score": scores}
    if hasattr(run, "predict_members"):
        out["score_std"] = spread
    if tta:
        out.update({f"score_d4_{k}": per_transform[:, k] for k in range(D4_ELEMENTS)})
    out.update({"reason": np.asarray(prepared["reason"], str), "message": np.asarray(prepared["message"], str)})
    return out


def prepare_part(row: dict[str, Any], **prepare: Any) -> dict[str, Any]:
    """CPU stage of the GPU pipeline: one part's cutouts read and preprocessed (``prepare_batch``), for the
    actors that only predict. The row carries the part's IDs."""
    started = time.time()
    part_ids = np.asarray(row["ids"], dtype=np.int64)
    return {"part": int(row["part"]), "started": started, **prepare_batch({"id": part_ids}, **prepare)}


def _part_ids(ids: np.ndarray, part: int, part_size: int) -> np.ndarray:
    return np.asarray(ids[part * part_size : (part + 1) * part_size], dtype=np.int64)


class PartScorer:
    """Actor stage: the network, loaded once per actor; one call scores one part and writes it as a Parquet
    file, so results stream to storage and only counts reach the driver.

    With ``prepare`` (the CPU pipeline) the actor also reads and preprocesses its part, ``batch_size`` IDs at a
    time: one actor per CPU does the whole read -> preprocess -> forward, none waits for another. Without it
    (GPU actors) the part arrives prepared by CPU tasks (``prepare_part``). ``threads``: torch's threads, set
    explicitly so that scores and speed do not depend on the machine's core count.
    """

    def __init__(
        self,
        checkpoint_url: str | EnsembleSpec,
        tta: str | None,
        device: str,
        parts: PartPlan,
        batch_size: int,
        prepare: dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.run = load_model(checkpoint_url, device=device)
        self.tta, self.parts, self.batch_size, self.prepare = tta, parts, batch_size, prepare

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        part, cpu = int(batch["part"][0]), time.process_time()
        if self.prepare is None:
            started = float(batch["started"][0])
            prepared = {key: np.asarray(batch[key][0]) for key in ("id", "image", "reason", "message")}
            scored = score_prepared(self.run, prepared, self.tta, self.batch_size)
        else:
            started = time.time()
            ids = np.asarray(batch["ids"][0], dtype=np.int64)
            chunks = [
                score_prepared(
                    self.run,
                    prepare_batch({"id": ids[i : i + self.batch_size]}, **self.prepare),
                    self.tta,
                    self.batch_size,
                )
                for i in range(0, len(ids), self.batch_size)
            ]
            scored = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}
        timing = {"started": started, "finished": time.time(), "cpu_s": time.process_time() - cpu}
        write_part(self.parts.url, part, scored, timing)
        rejected = int((scored["reason"] != "").sum())
        return {"part": [part], "scored": [len(scored["id"]) - rejected], "rejected": [rejected]}


# --- parts: the streamed results, resumable ---------------------------------------------------------

PARTS_MANIFEST = "_manifest.json"  # leading "_": Parquet readers of the folder skip it
PART_METADATA = b"lensray"  # each part's Parquet metadata: index, started/finished (unix s), the actor's CPU s
MAX_PART = 1024  # IDs per part at most, by default: a kill loses at most this many per actor
PARTS_PER_ACTOR = 4  # by default, small catalogues are still cut into enough parts to keep every actor busy


@dataclass(frozen=True)
class PartPlan:
    """The catalogue cut into parts of ``part_size`` IDs (in catalogue order), one Parquet file each under
    ``url``; ``done``: the parts already complete (from an earlier run of the same job)."""

    url: str
    part_size: int
    n_parts: int
    done: frozenset[int] = frozenset()
    discarded: int = 0  # finished parts of an earlier job removed by ``fresh``

    def part_url(self, part: int) -> str:
        return part_url(self.url, part)


def part_url(parts_url: str, part: int) -> str:
    return storage.join(parts_url, f"part-{part:06d}.parquet")


def write_part(parts_url: str, part: int, scored: dict[str, np.ndarray], timing: dict[str, float]) -> None:
    """One part's rows (id, score, the D4 views, reason, message; rejects with NaN scores) as one Parquet
    file, written whole or not at all (``storage.write_bytes``): a part file that exists is complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        key: pa.array(np.asarray(values).tolist(), pa.string())
        if key in ("reason", "message")
        else pa.array(values, pa.int64() if key == "id" else pa.float64())
        for key, values in scored.items()
    }
    table = pa.table(columns).replace_schema_metadata({PART_METADATA: json.dumps({"part": part, **timing})})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(part_url(parts_url, part), sink.getvalue().to_pybytes())


def finished_parts(parts_url: str) -> dict[int, str]:
    """``{part index: file name}`` of the complete part files under ``parts_url`` ({} when there are none)."""
    import pyarrow.fs as pafs

    fs, path = storage.arrow_filesystem(parts_url)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    entries = storage.retrying("list", parts_url, lambda: fs.get_file_info(selector))
    found = {}
    for entry in entries:
        match = re.fullmatch(r"part-(\d+)\.parquet", entry.base_name)
        if match and entry.type == pafs.FileType.File:
            found[int(match.group(1))] = entry.base_name
    return found


def score_fingerprint(inputs: ScoreInputs, tta: str | None) -> dict[str, Any]:
    """What the parts' contents depend on: the weights (their bytes, wherever the checkpoint lives), the
    transform, the images, the NaN policy, TTA and the IDs. A rerun resumes only when all of it is the same."""
    from lensray.runs import STATE_FILE

    checkpoints = inputs.ensemble.checkpoints if inputs.ensemble else (inputs.checkpoint_url,)
    digests = [hashlib.sha256(storage.read_bytes(storage.join(c, STATE_FILE))).hexdigest() for c in checkpoints]
    return {
        # One run: its weights' digest; an ensemble: the digest of its members' digests, in order.
        "weights_sha256": digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest(),
        "bands": list(inputs.prepared.bands),
        "transform": inputs.prepared.preprocess.model_dump(mode="json", exclude={"out", "workers", "strict"}),
        "images": inputs.images_url,
        "nan_policy": inputs.nan_policy,
        "tta": tta,
        "ids_sha256": hashlib.sha256(np.ascontiguousarray(inputs.ids, dtype="<i8").tobytes()).hexdigest(),
        **_profile_entry(inputs),
    }


def _profile_entry(inputs: ScoreInputs) -> dict[str, Any]:
    """The cutouts' layout, recorded when it is not the challenge's (whose jobs record what they always did)."""
    if inputs.profile == PROFILES[DEFAULT_PROFILE]:
        return {}
    return {"profile": inputs.profile.model_dump(mode="json")}


def plan_parts(
    inputs: ScoreInputs, parts_url: str, tta: str | None, part_size: int | None, actors: int, fresh: bool = False
) -> PartPlan:
    """Resume the parts under ``parts_url`` when its manifest records the same fingerprint (its part size
    is kept); refuse another job's parts (ScoreError naming what differs) unless ``fresh``, which removes
    them and starts afresh. A new job's part size: ``part_size``, or enough parts for every actor."""
    if part_size is not None and part_size < 1:
        raise ScoreError(f"--part-size must be at least 1, got {part_size}")
    fingerprint = score_fingerprint(inputs, tta)
    manifest_url = storage.join(parts_url, PARTS_MANIFEST)
    done = finished_parts(parts_url)
    n = len(inputs.ids)
    if storage.exists(manifest_url):
        manifest = json.loads(storage.read_bytes(manifest_url))
        recorded = manifest.get("fingerprint", {})
        differs = sorted(k for k in fingerprint.keys() | recorded.keys() if fingerprint.get(k) != recorded.get(k))
        if not differs and not fresh:
            size = int(manifest["part_size"])
            return PartPlan(parts_url, size, -(-n // size), frozenset(k for k in done if k < -(-n // size)))
        if differs and done and not fresh:
            raise ScoreError(
                f"{parts_url} holds {len(done)} finished part(s) of another scoring job (it differs in "
                f"{', '.join(differs)}): rerun with --fresh to discard them and start afresh, or choose another --out"
            )
    elif done and not fresh:
        raise ScoreError(f"{parts_url} holds {len(done)} part file(s) but no {PARTS_MANIFEST}: rerun with --fresh")
    _remove_parts(parts_url, done.values())
    size = part_size or min(MAX_PART, max(16, -(-n // (PARTS_PER_ACTOR * actors))))
    manifest = {"fingerprint": fingerprint, "part_size": size, "n_ids": n, "checkpoint": inputs.checkpoint_url}
    storage.write_bytes(manifest_url, json.dumps(manifest, indent=1).encode())
    return PartPlan(parts_url, size, -(-n // size), frozenset(), discarded=len(done))


def _remove_parts(parts_url: str, names: Any) -> None:
    fs, path = storage.arrow_filesystem(parts_url)
    for name in names:
        storage.retrying("delete", f"{parts_url}/{name}", lambda name=name: fs.delete_file(f"{path}/{name}"))


def read_parts(plan: PartPlan, tta: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(id + scores of the scored IDs, id/reason/message of the rejects)`` read back from every part, one
    part at a time: the driver never holds more than the IDs and their scores (``score``, ``score_std`` for an
    ensemble, the D4 views with ``tta``: the columns the parts hold)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    found = finished_parts(plan.url)
    missing = sorted(set(range(plan.n_parts)) - set(found))
    if missing:
        raise ScoreError(f"{plan.url}: part(s) {missing[:10]} missing after the run; rerun to score them")

    def read(part: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        table = pq.read_table(io.BytesIO(storage.read_bytes(plan.part_url(part))))
        ok = pc.equal(table["reason"], "")
        score_columns = [name for name in table.column_names if name not in ("reason", "message")]
        return (
            table.filter(ok).select(score_columns).to_pandas(),
            table.filter(pc.invert(ok)).select(["id", "reason", "message"]).to_pandas(),
        )

    # Object stores answer faster to several requests at once; local files are read one after another.
    with ThreadPoolExecutor(max_workers=8 if storage.is_s3(plan.url) else 1) as pool:
        accepted, rejects = zip(*pool.map(read, range(plan.n_parts)), strict=True)
    return pd.concat(accepted, ignore_index=True), pd.concat(rejects, ignore_index=True)


# --- the whole catalogue: computing ------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ScoreInputs:
    """A scoring job's checked inputs: the checkpoint, what its network takes, the catalogue's IDs."""

    checkpoint_url: str
    images_url: str
    catalog_url: str
    prepared: ModelInput
    nan_policy: str
    ids: np.ndarray  # unique, in catalogue order
    repeated: tuple[int, ...]  # IDs listed more than once (scored once)
    started: float  # perf_counter when the job began: wall times count from it
    columns: pd.DataFrame | None = None  # id + ra/dec + kept catalogue columns, joined to the candidates
    profile: SurveyProfile = PROFILES[DEFAULT_PROFILE]  # the cutouts' layout: the training store's
    ensemble: EnsembleSpec | None = None  # an ensemble's members (``checkpoint_url`` is then its label)

    @property
    def model(self) -> str | EnsembleSpec:
        """What the actors load: the checkpoint, or the ensemble."""
        return self.ensemble or self.checkpoint_url


@dataclass(frozen=True, eq=False)
class ScoreResult:
    """Ranked candidates, rejects and the top candidates' images: everything the output files hold."""

    inputs: ScoreInputs
    tta: str | None
    candidates: pd.DataFrame  # rank, id, score (score_d4_0..7 with tta; ra, dec, kept columns), best first
    rejects: pd.DataFrame  # id, reason, message, by id
    top: pd.DataFrame  # the gallery's candidates (the first rows of ``candidates``)
    gallery_images: np.ndarray | None  # ``top`` as the network saw them; None without a gallery
    device: str
    actors: int
    score_s: float  # reading, preprocessing and predicting every cutout
    parts: PartPlan | None = None  # where the per-part results stream to; ``parts.done``: resumed parts


def prepare_scoring(
    checkpoint_url: str | EnsembleSpec,
    images_url: str,
    catalog_url: str,
    out_url: str | None = None,
    nan_policy: str | None = None,
    data: DataConfig | None = None,
    profile: SurveyProfile | None = None,
) -> ScoreInputs:
    """Check everything that can fail before any Ray work: the checkpoint, the URLs, the catalogue (read
    with ``data``'s catalogue options: id, coordinate and kept columns, format). ``checkpoint_url``: a
    checkpoint, a run folder (its best checkpoint) or an ensemble, whose members share their input. The
    cutouts' layout is the training store's profile; ``profile`` (``--profile``), when given, must be the same."""
    from lensray.runs import load_run, resolve_checkpoint

    started = time.perf_counter()
    ensemble = checkpoint_url if isinstance(checkpoint_url, EnsembleSpec) else None
    checkpoint_url = ensemble.label if ensemble else resolve_checkpoint(checkpoint_url)
    runs = load_model(ensemble).runs if ensemble else [load_run(checkpoint_url)]  # fail fast on a bad checkpoint
    run = runs[0]
    prepared, survey = checkpoint_input(ensemble.checkpoints[0] if ensemble else checkpoint_url, run.config, profile)
    storage.check_reachable(images_url)
    if out_url is not None:
        storage.check_reachable(out_url, must_exist=False)
    ids, repeated, columns = read_catalog_columns(catalog_url, data)
    if ids.size == 0:
        raise ScoreError(f"catalogue {catalog_url} lists no IDs")
    return ScoreInputs(
        checkpoint_url=checkpoint_url,
        images_url=images_url,
        catalog_url=catalog_url,
        prepared=prepared,
        nan_policy=nan_policy or run.config.data.nan,
        ids=ids,
        repeated=tuple(repeated),
        started=started,
        columns=columns if columns.shape[1] > 1 else None,
        profile=survey,
        ensemble=ensemble,
    )


def _scoring_dataset(
    inputs: ScoreInputs,
    plan: PartPlan,
    tta: str | None,
    device: str,
    actors: int,
    gpus: float,
    batch_size: int,
    split: bool,
) -> Any:
    """The Ray Data pipeline over the parts still to do, one row per part. On CPUs: one actor per CPU reads,
    preprocesses, predicts and writes its parts. With GPUs: CPU tasks read and preprocess whole parts, one
    actor per GPU predicts and writes them."""
    import ray

    # Each row carries its part's IDs: an object-store reference among the actors' arguments would make Ray
    # warn that a restarted actor may not find it (ray-project/ray#53727).
    todo = [
        {"part": k, "ids": _part_ids(inputs.ids, k, plan.part_size).tolist()}
        for k in range(plan.n_parts)
        if k not in plan.done
    ]
    prepare = {
        "images_url": inputs.images_url,
        "bands": inputs.prepared.bands,
        "preprocess": inputs.prepared.preprocess,
        "nan_policy": inputs.nan_policy,
        "profile": inputs.profile,
    }
    scorer = {"checkpoint_url": inputs.model, "tta": tta, "device": device, "parts": plan}
    scorer.update(batch_size=batch_size, threads=None if gpus else 1)
    dataset = ray.data.from_items(todo, override_num_blocks=len(todo))
    if split:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) - (0 if gpus else actors))
        dataset = dataset.map(
            prepare_part,
            fn_kwargs=prepare,
            compute=ray.data.TaskPoolStrategy(size=min(cpus, len(todo))),
            num_cpus=1,
        )
    else:
        scorer["prepare"] = prepare
    return dataset.map_batches(
        PartScorer,
        batch_size=1,  # one part per call
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(todo)), max_tasks_in_flight_per_actor=2),
        num_gpus=gpus,
        num_cpus=0 if gpus else 1,
        fn_constructor_kwargs=scorer,
    )


def _run_parts(inputs: ScoreInputs, plan: PartPlan, dataset: Any) -> int:
    """Drive the pipeline: one progress step per finished part (the resumed ones counted at the start)."""
    resumed = sum(len(_part_ids(inputs.ids, k, plan.part_size)) for k in plan.done)
    scored = 0
    with progress(len(inputs.ids), "score", "ID") as bar:
        bar.update(resumed)
        if dataset is not None:
            for row in dataset.iter_rows():
                bar.update(int(row["scored"]) + int(row["rejected"]))
                scored += 1
    return scored


def _rank(
    accepted: pd.DataFrame, rejects: pd.DataFrame, columns: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(candidates best first with their rank and the catalogue ``columns``, rejects by ID)``."""
    rejects = _plain_columns(rejects).sort_values("id").reset_index(drop=True)
    candidates = _plain_columns(accepted).sort_values(["score", "id"], ascending=[False, True]).reset_index(drop=True)
    candidates.insert(0, "rank", np.arange(1, len(candidates) + 1))
    if columns is not None:
        candidates = candidates.merge(columns, on="id", how="left", validate="one_to_one")
    return candidates, rejects


def compute_scores(
    inputs: ScoreInputs,
    parts_url: str,
    *,
    tta: str | None = None,
    device: str = "auto",
    actors: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    gallery: int = DEFAULT_GALLERY,
    part_size: int | None = None,
    fresh: bool = False,
    split: bool | None = None,
) -> ScoreResult:
    """Score every catalogue ID on the Ray cluster, streaming per-part Parquet files to ``parts_url``
    (resuming the parts an earlier run of the same job finished); rank; re-read the top ``gallery``.

    ``split``: CPU tasks read and preprocess, the actors only predict (default: on GPUs only; on CPUs one
    actor per CPU does everything, which keeps every core busy)."""
    import ray

    started = time.perf_counter()
    tta = check_tta(tta)
    ensure_ray()
    device, n_actors, gpus = _device_and_actors(device, actors)
    split = bool(gpus) if split is None else split
    if split and not gpus and actors is None:
        n_actors = max(1, n_actors // 2)  # leave CPUs to the tasks that feed the actors
    plan = plan_parts(inputs, parts_url, tta, part_size, n_actors, fresh)
    # Not raise_original_map_exception: with it Ray Data logs the whole traceback to stderr before raising;
    # errors.find_cause rebuilds the lensray error from the UserCodeException instead.
    ray.data.DataContext.get_current().enable_progress_bars = False  # lensray draws its own
    todo = plan.n_parts - len(plan.done)
    dataset = _scoring_dataset(inputs, plan, tta, device, n_actors, gpus, batch_size, split) if todo else None
    _run_parts(inputs, plan, dataset)
    accepted, rejected = read_parts(plan, tta)
    found = np.sort(np.concatenate([accepted["id"].to_numpy(), rejected["id"].to_numpy()]))
    if not np.array_equal(found, np.sort(inputs.ids)):
        raise ScoreError(
            f"the parts under {parts_url} hold {len(found)} rows for {len(inputs.ids)} IDs; rerun with --fresh"
        )
    candidates, rejects = _rank(accepted, rejected, inputs.columns)
    top = candidates.head(gallery)
    return ScoreResult(
        inputs=inputs,
        tta=tta,
        candidates=candidates,
        rejects=rejects,
        top=top,
        gallery_images=gallery_images(inputs, top) if gallery and len(top) else None,
        device=device,
        actors=n_actors,
        score_s=time.perf_counter() - started,
        parts=plan,
    )


def gallery_images(inputs: ScoreInputs, top: pd.DataFrame) -> np.ndarray:
    """The ``top`` candidates re-read and preprocessed, as the network saw them."""
    from lensray.ingest.preprocess import preprocess_batch
    from lensray.sky.fits import read_cutouts

    prepared = inputs.prepared
    cutouts, failed = read_cutouts(
        inputs.images_url, top["id"].tolist(), prepared.bands, inputs.nan_policy, profile=inputs.profile
    )
    if failed:  # they were read a moment ago: the data changed under us
        raise ScoreError(f"top candidates could not be re-read for the gallery: {[str(f) for f in failed]}")
    images = preprocess_batch(
        [c.bands for c in cutouts],
        prepared.preprocess,
        prepared.bands,
        [c.object_id for c in cutouts],
        profile=inputs.profile,
        wcs=[c.wcs for c in cutouts],
    )
    return np.asarray(images, np.float32)


# --- the whole catalogue: writing ---------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSummary:
    candidates_url: str
    rejects_url: str
    gallery_path: str | None
    summary_url: str
    n_ids: int
    n_scored: int
    rejects: pd.DataFrame
    top: pd.DataFrame
    repeated_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    actors: int = 1
    wall_s: float = 0.0
    result: ScoreResult | None = None
    parts: PartPlan | None = None

    def __str__(self) -> str:
        lines = [
            f"scored {self.n_scored} of {self.n_ids} IDs in {self.wall_s:.1f} s "
            f"({self.n_scored / max(self.wall_s, 1e-9):.1f} IDs/s, {self.actors} {self.device} actor(s))",
            f"  candidates (ranked): {self.candidates_url}",
            f"  rejects ({len(self.rejects)}): {self.rejects_url}",
        ]
        if self.parts is not None:
            resumed = f"; {len(self.parts.done)} resumed from an earlier run" if self.parts.done else ""
            lines.append(f"  parts ({self.parts.n_parts} x {self.parts.part_size} IDs{resumed}): {self.parts.url}")
        if self.gallery_path:
            lines.append(f"  gallery of the top {len(self.top)}: {self.gallery_path}")
        for row in self.top.head(5).itertuples():
            where = f"  RA {row.ra:.5f} Dec {row.dec:+.5f}" if hasattr(row, "ra") else ""
            spread = f" +- {row.score_std:.4f}" if hasattr(row, "score_std") else ""
            lines.append(f"    #{row.rank:<4d} ID {row.id}  score {row.score:.4f}{spread}{where}")
        for row in self.rejects.head(5).itertuples():
            lines.append(f"    rejected {row.id}: {row.message}")
        if self.repeated_ids:
            lines.append(f"  {len(self.repeated_ids)} repeated catalogue ID(s) scored once: {self.repeated_ids[:10]}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _plain_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Numpy dtypes instead of Ray's Arrow-backed ones, so the Parquet file reads back as plain columns."""
    plain = {}
    for column in table.columns:
        if column == "id":
            plain[column] = table[column].to_numpy(dtype=np.int64)
        elif column in ("reason", "message"):
            plain[column] = table[column].astype(str).to_numpy(dtype=object)
        else:
            plain[column] = table[column].to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.DataFrame(plain)


def _sibling(out_url: str, suffix: str) -> str:
    stem = out_url[: -len(".parquet")] if out_url.endswith(".parquet") else out_url
    return f"{stem}{suffix}"


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


def _device_and_actors(device: str, actors: int | None) -> tuple[str, int, float]:
    """``(device, actors, gpus per actor)``; ``auto`` takes GPUs when the Ray cluster has them."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device not in ("auto", "cpu", "cuda"):
        raise ScoreError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device == "cuda" and gpus == 0:
        raise ScoreError("device cuda asked for, but the Ray cluster has no GPU")
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if use_gpu:
        return "cuda", actors or gpus, 1.0
    # One actor per CPU: each reads, preprocesses and predicts its own parts (none waits on a feeder).
    return "cpu", actors or max(1, int(ray.cluster_resources().get("CPU", 1))), 0.0


def score_catalog(
    checkpoint_url: str | EnsembleSpec,
    images_url: str,
    catalog_url: str,
    out_url: str,
    *,
    tta: str | None = None,
    device: str = "auto",
    actors: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    gallery: int = DEFAULT_GALLERY,
    nan_policy: str | None = None,
    data: DataConfig | None = None,
    part_size: int | None = None,
    fresh: bool = False,
    profile: SurveyProfile | None = None,
) -> ScoreSummary:
    """Score every catalogue ID from raw cutouts with a run, or an ensemble (``ensemble.EnsembleSpec``: the
    members' mean score, and ``score_std`` their spread, after ``score``); write ranked candidates, rejects
    and a gallery.

    ``data``: how the catalogue is read (``catalog_format``, ``id_column``, ``coord_columns``,
    ``keep_columns``; its URLs are not used). The cutouts are read in the training store's profile;
    ``profile`` (``--profile``), when given, must be that one. Outputs (local or s3://): ``out_url``
    (Parquet: rank, id, score, with ``tta`` the 8 per-view scores ``score_d4_0..7``, then ``ra``, ``dec`` and the kept
    columns, best first), ``<stem>_rejects.csv`` (id, reason, message of every
    cutout that could not be scored), ``<stem>_summary.json`` and ``<stem>_gallery.html`` (the top
    ``gallery`` candidates, every band, the network's input stretch, ID and score under each).

    Results stream, as they are produced, to ``<stem>_parts/part-NNNNNN.parquet`` (``part_size`` IDs each, in
    catalogue order: id, score, the D4 views, reason, message); a rerun of the same job after a kill scores
    only the parts not yet written. Parts of another job (other weights, images, transform, TTA or IDs) are
    refused unless ``fresh``, which discards them and starts afresh.
    """
    tta = check_tta(tta)
    inputs = prepare_scoring(checkpoint_url, images_url, catalog_url, out_url, nan_policy, data, profile)
    result = compute_scores(
        inputs,
        _sibling(out_url, "_parts"),
        tta=tta,
        device=device,
        actors=actors,
        batch_size=batch_size,
        gallery=gallery,
        part_size=part_size,
        fresh=fresh,
    )
    return write_scores(result, out_url)


def write_scores(result: ScoreResult, out_url: str) -> ScoreSummary:
    """Write ``<stem>_rejects.csv``, ``<stem>_gallery.html`` (when there are gallery images),
    ``<stem>_summary.json`` and, last, the candidates (Parquet): a candidates file that exists belongs to a
    finished scoring, even when the storage went away half-way through these writes."""
    rejects_url = _sibling(out_url, "_rejects.csv")
    storage.write_bytes(rejects_url, result.rejects.to_csv(index=False).encode())
    gallery_url = None
    if result.gallery_images is not None:
        gallery_url = _sibling(out_url, "_gallery.html")
        storage.write_bytes(gallery_url, candidate_gallery_html(result).encode())
    summary = ScoreSummary(
        candidates_url=out_url,
        rejects_url=rejects_url,
        gallery_path=gallery_url,
        summary_url=_sibling(out_url, "_summary.json"),
        n_ids=len(result.inputs.ids),
        n_scored=len(result.candidates),
        rejects=result.rejects,
        top=result.top,
        repeated_ids=list(result.inputs.repeated),
        notes=[*result.inputs.prepared.notes, *_parts_notes(result.parts)],
        device=result.device,
        actors=result.actors,
        wall_s=time.perf_counter() - result.inputs.started,
        result=result,
        parts=result.parts,
    )
    storage.write_bytes(summary.summary_url, json.dumps(summary_json(result, summary.wall_s), indent=1).encode())
    storage.write_bytes(out_url, _parquet_bytes(result.candidates))
    return summary


def summary_json(result: ScoreResult, wall_s: float) -> dict[str, Any]:
    """``<stem>_summary.json``: the job's inputs, the counts, every reject and the top candidates."""
    inputs = result.inputs
    return {
        "checkpoint": inputs.checkpoint_url,
        "members": None
        if inputs.ensemble is None
        else [{"name": m.name, "checkpoint": m.checkpoint} for m in inputs.ensemble.members],
        "ensemble_source": None if inputs.ensemble is None else inputs.ensemble.source,
        "images": inputs.images_url,
        "catalog": inputs.catalog_url,
        "tta": result.tta,
        "bands": list(inputs.prepared.bands),
        "transform": inputs.prepared.preprocess.model_dump(mode="json", exclude={"out"}),
        **_profile_entry(inputs),
        "nan_policy": inputs.nan_policy,
        "n_ids": len(inputs.ids),
        "n_scored": len(result.candidates),
        "n_rejected": len(result.rejects),
        "rejects": result.rejects.to_dict(orient="records"),
        "repeated_ids": list(inputs.repeated),
        "notes": list(inputs.prepared.notes),
        "device": result.device,
        "actors": result.actors,
        "wall_s": round(wall_s, 3),
        "catalog_columns": [] if inputs.columns is None else list(inputs.columns.columns[1:]),
        "top": result.top[_shown_columns(result.top)].to_dict(orient="records"),
        "parts": None if result.parts is None else _parts_json(result.parts),
    }


def _parts_notes(parts: PartPlan | None) -> list[str]:
    if parts is None or not parts.discarded:
        return []
    return [f"--fresh: discarded {parts.discarded} finished part(s) of an earlier job under {parts.url}"]


def _parts_json(parts: PartPlan) -> dict[str, Any]:
    return {
        "url": parts.url,
        "part_size": parts.part_size,
        "n_parts": parts.n_parts,
        "resumed": len(parts.done),
        "discarded": parts.discarded,
    }


def _shown_columns(top: pd.DataFrame) -> list[str]:
    """The candidate columns a summary shows: rank, id, score and, when the catalogue gave them, ra and dec."""
    return [name for name in ("rank", "id", "score", "score_std", "ra", "dec") if name in top.columns]


def candidate_gallery_html(result: ScoreResult) -> str:
    """A self-contained page: the top candidates as the network saw them, and the rejects."""
    from lensray.evaluate.report import gallery_png, html_page, html_table

    inputs, top, rejects = result.inputs, result.top, result.rejects
    prepared, esc = inputs.prepared, html.escape
    spread = ["" if getattr(r, "score_std", None) is None else f" +- {r.score_std:.4f}" for r in top.itertuples()]
    captions = [f"#{r.rank} ID {r.id}\nscore {r.score:.4f}{s}" for r, s in zip(top.itertuples(), spread, strict=True)]
    picture = gallery_png(result.gallery_images, captions, prepared.bands, per_row=max(1, 12 // len(prepared.bands)))
    blocks = [
        f"<p>Checkpoint <code>{esc(inputs.checkpoint_url)}</code>; catalogue <code>{esc(inputs.catalog_url)}</code>; "
        f"images <code>{esc(inputs.images_url)}</code>; test-time averaging: {result.tta or 'none'}. Bands "
        f"{', '.join(prepared.bands)} as the network sees them ({prepared.preprocess.mode} mode), one fixed "
        "display range per band.</p>",
        ("Top candidates", picture),
        html_table(top[_shown_columns(top)].to_dict(orient="records"), _shown_columns(top)),
        f"<h2>Rejected cutouts ({len(rejects)})</h2>",
        html_table(rejects.to_dict(orient="records"), ["id", "reason", "message"]) if len(rejects) else "<p>none</p>",
    ]
    return html_page(f"lensray candidates: top {len(top)}", blocks)
