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
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lensray import storage
from lensray.config import DataConfig, PreprocessConfig
from lensray.errors import CatalogError, ScoreError
from lensray.evaluate.inference import check_tta, predict_tta
from lensray.runs import ModelInput, model_input
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
    batch: dict[str, np.ndarray], images_url: str, bands: Sequence[str], preprocess: PreprocessConfig, nan_policy: str
) -> dict[str, np.ndarray]:
    """CPU stage: read and preprocess a batch of IDs exactly as the ingest does (the same reader and
    ``preprocess_cutouts``, so the same rejects and reasons). Rejected IDs keep a NaN image and their reason."""
    from lensray.ingest.preprocess import output_shape, preprocess_cutouts
    from lensray.sky.fits import read_cutouts

    ids = np.asarray(batch["id"], dtype=np.int64)
    size = output_shape(preprocess)[0]
    images = np.full((len(ids), len(bands), size, size), np.nan, dtype=np.float32)
    reasons = np.full(len(ids), "", dtype=object)
    messages = np.full(len(ids), "", dtype=object)
    cutouts, unread = read_cutouts(images_url, ids.tolist(), bands, nan_policy)
    prepared = preprocess_cutouts(cutouts, preprocess, bands)
    position = {int(object_id): k for k, object_id in enumerate(ids)}
    for cutout, image, accepted in zip(cutouts, prepared.images, prepared.accepted, strict=True):
        if accepted:
            images[position[cutout.object_id]] = image
    for reject in [*unread, *prepared.rejects]:
        reasons[position[reject.object_id]], messages[position[reject.object_id]] = reject.reason, reject.message
    return {"id": ids, "image": images, "reason": reasons.astype(str), "message": messages.astype(str)}


class CutoutScorer:
    """Actor stage: the network, loaded once per actor, scores the batches' accepted images."""

    def __init__(self, checkpoint_url: str, tta: str | None, device: str, threads: int | None = None) -> None:
        from lensray.runs import load_run

        if threads:
            torch.set_num_threads(threads)
        self.run = load_run(checkpoint_url, device=device)
        self.tta = tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["reason"] == ""
        n = len(batch["id"])
        scores = np.full(n, np.nan)
        per_transform = np.full((n, D4_ELEMENTS), np.nan)
        if ok.any():
            mean, per = predict_tta(self.run, batch["image"][ok], self.tta)
            scores[ok] = mean
            if per is not None:
                per_transform[ok] = per
        out = {"id": batch["id"], "score": scores, "reason": batch["reason"], "message": batch["message"]}
        if self.tta:
            out.update({f"score_d4_{k}": per_transform[:, k] for k in range(D4_ELEMENTS)})
        return out


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


def prepare_scoring(
    checkpoint_url: str,
    images_url: str,
    catalog_url: str,
    out_url: str | None = None,
    nan_policy: str | None = None,
    data: DataConfig | None = None,
) -> ScoreInputs:
    """Check everything that can fail before any Ray work: the checkpoint, the URLs, the catalogue (read
    with ``data``'s catalogue options: id, coordinate and kept columns, format)."""
    from lensray.runs import load_run, resolve_checkpoint

    started = time.perf_counter()
    checkpoint_url = resolve_checkpoint(checkpoint_url)
    run = load_run(checkpoint_url)  # fail fast on a bad checkpoint
    prepared = model_input(checkpoint_url, run.config)
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
    )


def _scoring_dataset(inputs: ScoreInputs, tta: str | None, device: str, actors: int, gpus: float, batch_size: int):
    """The Ray Data pipeline: IDs -> CPU tasks (read, preprocess) -> actor pool (predict)."""
    import ray

    blocks = max(1, min(len(inputs.ids) // batch_size + 1, 4 * int(ray.cluster_resources().get("CPU", 1))))
    prepare_kwargs = {
        "images_url": inputs.images_url,
        "bands": inputs.prepared.bands,
        "preprocess": inputs.prepared.preprocess,
        "nan_policy": inputs.nan_policy,
    }
    scorer_kwargs = {
        "checkpoint_url": inputs.checkpoint_url,
        "tta": tta,
        "device": device,
        "threads": None if gpus else 1,
    }
    return (
        ray.data.from_items([{"id": int(i)} for i in inputs.ids], override_num_blocks=blocks)
        .map_batches(prepare_batch, batch_size=batch_size, batch_format="numpy", num_cpus=1, fn_kwargs=prepare_kwargs)
        .map_batches(
            CutoutScorer,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=0 if gpus else 1,
            fn_constructor_kwargs=scorer_kwargs,
        )
    )


def _collect(dataset: Any, total: int) -> pd.DataFrame:
    """Every scored row, block by block as the pipeline finishes them (one progress step per block)."""
    parts = []
    with progress(total, "score", "cutout") as bar:
        for block in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            parts.append(_plain_columns(block))
            bar.update(len(block))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"id": np.empty(0, np.int64)})


def _rank(
    table: pd.DataFrame, tta: str | None, columns: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(candidates best first with their rank and the catalogue ``columns``, rejects by ID)``."""
    rejected = table["reason"] != ""
    rejects = table.loc[rejected, ["id", "reason", "message"]].sort_values("id").reset_index(drop=True)
    score_columns = ["score", *(f"score_d4_{k}" for k in range(D4_ELEMENTS) if tta)]
    candidates = (
        table.loc[~rejected, ["id", *score_columns]]
        .sort_values(["score", "id"], ascending=[False, True])
        .reset_index(drop=True)
    )
    candidates.insert(0, "rank", np.arange(1, len(candidates) + 1))
    if columns is not None:
        candidates = candidates.merge(columns, on="id", how="left", validate="one_to_one")
    return candidates, rejects


def compute_scores(
    inputs: ScoreInputs,
    *,
    tta: str | None = None,
    device: str = "auto",
    actors: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    gallery: int = DEFAULT_GALLERY,
) -> ScoreResult:
    """Score every catalogue ID on the Ray cluster; rank; re-read the top ``gallery`` for the gallery."""
    import ray

    started = time.perf_counter()
    tta = check_tta(tta)
    ensure_ray()
    device, n_actors, gpus = _device_and_actors(device, actors)
    ray.data.DataContext.get_current().enable_progress_bars = False  # lensray draws its own
    dataset = _scoring_dataset(inputs, tta, device, n_actors, gpus, batch_size)
    table = _collect(dataset, len(inputs.ids))
    if len(table) != len(inputs.ids) or set(table["id"]) != set(inputs.ids.tolist()):
        raise ScoreError(
            f"scoring returned {len(table)} rows for {len(inputs.ids)} IDs; rerun (a worker may have died)"
        )
    candidates, rejects = _rank(table, tta, inputs.columns)
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
    )


def gallery_images(inputs: ScoreInputs, top: pd.DataFrame) -> np.ndarray:
    """The ``top`` candidates re-read and preprocessed, as the network saw them."""
    from lensray.ingest.preprocess import preprocess_batch
    from lensray.sky.fits import read_cutouts

    prepared = inputs.prepared
    cutouts, failed = read_cutouts(inputs.images_url, top["id"].tolist(), prepared.bands, inputs.nan_policy)
    if failed:  # they were read a moment ago: the data changed under us
        raise ScoreError(f"top candidates could not be re-read for the gallery: {[str(f) for f in failed]}")
    images = preprocess_batch(
        [c.bands for c in cutouts], prepared.preprocess, prepared.bands, [c.object_id for c in cutouts]
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

    def __str__(self) -> str:
        lines = [
            f"scored {self.n_scored} of {self.n_ids} IDs in {self.wall_s:.1f} s "
            f"({self.n_scored / max(self.wall_s, 1e-9):.1f} IDs/s, {self.actors} {self.device} actor(s))",
            f"  candidates (ranked): {self.candidates_url}",
            f"  rejects ({len(self.rejects)}): {self.rejects_url}",
        ]
        if self.gallery_path:
            lines.append(f"  gallery of the top {len(self.top)}: {self.gallery_path}")
        for row in self.top.head(5).itertuples():
            where = f"  RA {row.ra:.5f} Dec {row.dec:+.5f}" if hasattr(row, "ra") else ""
            lines.append(f"    #{row.rank:<4d} ID {row.id}  score {row.score:.4f}{where}")
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
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Leave a CPU for the read/preprocess tasks that feed the actors.
    return "cpu", actors or max(1, cpus // 2), 0.0


def score_catalog(
    checkpoint_url: str,
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
) -> ScoreSummary:
    """Score every catalogue ID from raw cutouts; write ranked candidates, rejects and a gallery.

    ``data``: how the catalogue is read (``catalog_format``, ``id_column``, ``coord_columns``,
    ``keep_columns``; its URLs are not used). Outputs (local or s3://): ``out_url`` (Parquet: rank, id,
    score, with ``tta`` the 8 per-view scores ``score_d4_0..7``, then ``ra``, ``dec`` and the kept
    columns, best first), ``<stem>_rejects.csv`` (id, reason, message of every
    cutout that could not be scored), ``<stem>_summary.json`` and ``<stem>_gallery.html`` (the top
    ``gallery`` candidates, every band, the network's input stretch, ID and score under each).
    """
    tta = check_tta(tta)
    inputs = prepare_scoring(checkpoint_url, images_url, catalog_url, out_url, nan_policy, data)
    result = compute_scores(inputs, tta=tta, device=device, actors=actors, batch_size=batch_size, gallery=gallery)
    return write_scores(result, out_url)


def write_scores(result: ScoreResult, out_url: str) -> ScoreSummary:
    """Write the candidates (Parquet), ``<stem>_rejects.csv``, ``<stem>_gallery.html`` (when there are
    gallery images) and, last, ``<stem>_summary.json``."""
    rejects_url = _sibling(out_url, "_rejects.csv")
    storage.write_bytes(out_url, _parquet_bytes(result.candidates))
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
        notes=list(result.inputs.prepared.notes),
        device=result.device,
        actors=result.actors,
        wall_s=time.perf_counter() - result.inputs.started,
        result=result,
    )
    storage.write_bytes(summary.summary_url, json.dumps(summary_json(result, summary.wall_s), indent=1).encode())
    return summary


def summary_json(result: ScoreResult, wall_s: float) -> dict[str, Any]:
    """``<stem>_summary.json``: the job's inputs, the counts, every reject and the top candidates."""
    inputs = result.inputs
    return {
        "checkpoint": inputs.checkpoint_url,
        "images": inputs.images_url,
        "catalog": inputs.catalog_url,
        "tta": result.tta,
        "bands": list(inputs.prepared.bands),
        "transform": inputs.prepared.preprocess.model_dump(mode="json", exclude={"out"}),
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
    }


def _shown_columns(top: pd.DataFrame) -> list[str]:
    """The candidate columns a summary shows: rank, id, score and, when the catalogue gave them, ra and dec."""
    return [name for name in ("rank", "id", "score", "ra", "dec") if name in top.columns]


def candidate_gallery_html(result: ScoreResult) -> str:
    """A self-contained page: the top candidates as the network saw them, and the rejects."""
    from lensray.evaluate.report import gallery_png, html_page, html_table

    inputs, top, rejects = result.inputs, result.top, result.rejects
    prepared, esc = inputs.prepared, html.escape
    captions = [f"#{r.rank} ID {r.id}\nscore {r.score:.4f}" for r in top.itertuples()]
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
