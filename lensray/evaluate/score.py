"""Scoring whole catalogues of raw cutouts on Ray (``inference.predict_tta`` turns the images into scores).

``score_catalog`` scores every ID of a catalogue straight from the raw FITS cutouts with Ray
Data: CPU tasks read and preprocess batches of cutouts (exactly the transform the network was trained
on, as recorded in its checkpoint), an actor pool holding the network (one GPU each when the cluster
has GPUs) predicts, and the driver ranks the scores. A cutout that cannot be read or preprocessed is
listed with its reason in the rejects file, never scored (a zero image would get a real-looking score).

``score_inputs.prepare_scoring`` checks the inputs, ``compute_scores`` (here: the Ray pipeline, the ranking)
returns a ``score_output.ScoreResult`` (ranked candidates, rejects, the gallery's images, timings) and
``score_output.write_scores`` writes the files; ``score_catalog`` does all three. The actors stream their
results to resumable per-part files (``parts``).

An ensemble (``ensemble.EnsembleSpec``) scores like a run: each actor holds every member, each cutout is read
and preprocessed once for all of them, the score is the members' mean and ``score_std`` their spread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from lensray.config import DataConfig, PreprocessConfig
from lensray.errors import ScoreError
from lensray.evaluate.ensemble import EnsembleSpec, load_model
from lensray.evaluate.inference import check_tta, predict_scored
from lensray.evaluate.parts import PartPlan, plan_parts, read_parts, write_part
from lensray.evaluate.score_inputs import ScoreInputs, prepare_scoring
from lensray.evaluate.score_output import ScoreResult, ScoreSummary, sibling_url, write_scores
from lensray.profiles import SurveyProfile
from lensray.runtime import ensure_ray, progress
from lensray.sky.symmetry import D4_ELEMENTS

DEFAULT_BATCH = 64
DEFAULT_GALLERY = 24

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


# --- the whole catalogue ---------------------------------------------------------------------------


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
        sibling_url(out_url, "_parts"),
        tta=tta,
        device=device,
        actors=actors,
        batch_size=batch_size,
        gallery=gallery,
        part_size=part_size,
        fresh=fresh,
    )
    return write_scores(result, out_url)
