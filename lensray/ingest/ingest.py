"""Ray Data ingest: raw FITS cutouts in a survey profile's layout (``data.profile``; local or object
storage) -> one preprocessed Zarr store, which records the profile (``meta["profile"]``).

The driver reads the catalogue (any table ``sky.catalog.load_catalog`` reads), labels it (an unlabelled
catalogue is stored with label -1: it can be scored, not trained on), sorts the IDs, assigns each a split from a hash of (seed, ID)
(so growing the catalogue never moves an ID between splits) and cuts the sorted IDs into shards. One Ray
task per shard reads that shard's cutouts, preprocesses them as a batch and writes the whole Zarr shard
(concurrent writes into one shard lose data on S3). The driver only ever holds IDs and summaries, so its
memory does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lensray import runtime, storage
from lensray.config import DataConfig, PreprocessConfig
from lensray.errors import IngestError
from lensray.ingest.preprocess import describe, output_shape, preprocess_cutouts
from lensray.ingest.store import SPLITS, completed_shards, create_store, finalize_store, shard_ranges, write_shard
from lensray.runtime import ensure_ray
from lensray.sky.catalog import Catalog, LabelledIDs, label_ids, load_catalog
from lensray.sky.fits import read_cutouts

log = logging.getLogger(__name__)
# DataConfig keys that say how the catalogue is read; recorded in the store's meta when not the defaults.
CATALOG_KEYS: tuple[str, ...] = ("catalog_format", "id_column", "label_column", "coord_columns", "keep_columns")


def assign_splits(ids: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """0 train / 1 val / 2 test per ID, from a hash of (seed, ID): independent of the other IDs."""
    uniform = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{int(i)}".encode(), digest_size=8).digest(), "big") / 2**64
            for i in ids
        ],
        dtype=np.float64,
    )
    split = np.zeros(len(ids), dtype=np.int8)
    split[uniform < test_fraction + val_fraction] = SPLITS["val"]
    split[uniform < test_fraction] = SPLITS["test"]
    return split


@dataclass
class IngestSummary:
    store_url: str
    n_ids: int
    n_shards: int
    shards_written: int
    shards_skipped: int
    n_written: int
    rejects: list[dict[str, Any]] = field(default_factory=list)
    excluded_by_label_rule: int = 0
    duplicate_ids: int = 0
    wall_s: float = 0.0
    unlabelled: int = 0  # IDs stored with label -1 (a catalogue without labels)

    def __str__(self) -> str:
        lines = [
            f"store: {self.store_url}",
            f"  {self.n_ids} IDs in {self.n_shards} shards ({self.shards_written} written, "
            f"{self.shards_skipped} already complete) in {self.wall_s:.1f} s",
            f"  {self.n_written} cutouts written, {len(self.rejects)} rejected, "
            f"{self.excluded_by_label_rule} excluded by the label rule, {self.duplicate_ids} duplicate catalogue rows dropped",
        ]
        if self.unlabelled:
            lines.append(f"  {self.unlabelled} IDs unlabelled (label -1): the store can be scored, not trained on")
        by_reason: dict[str, int] = {}
        for reject in self.rejects:
            by_reason[reject["reason"]] = by_reason.get(reject["reason"], 0) + 1
        for reason, count in sorted(by_reason.items()):
            lines.append(f"    rejected ({reason}): {count}")
        for reject in self.rejects[:10]:
            lines.append(f"    {reject['id']}: {reject['message']}")
        if len(self.rejects) > 10:
            lines.append(f"    ... {len(self.rejects) - 10} more (see `lensray store info {self.store_url}`)")
        return "\n".join(lines)


def _process_shard(
    item: dict[str, Any], data: DataConfig, preprocess: PreprocessConfig, store_url: str
) -> dict[str, Any]:
    """One Ray task: read a shard's cutouts, preprocess them together, write the whole shard.

    A bad object (unreadable, wrong shape, blank, or one whose preprocessed values overflow the store's
    dtype) becomes a named reject of its own; it never fails the task, so it never fails the run.
    """
    ids = item["ids"]
    cutouts, read_rejects = read_cutouts(data.images, ids, data.bands, data.nan, profile=data.profile)
    prepared = preprocess_cutouts(cutouts, preprocess, data.bands, profile=data.profile)
    kept = [cutout for cutout, ok in zip(cutouts, prepared.accepted, strict=True) if ok]
    row = {object_id: k for k, object_id in enumerate(ids)}
    channels, size = len(data.bands), output_shape(preprocess, data.profile)[0]
    images = np.full((len(ids), channels, size, size), np.nan, dtype=preprocess.dtype)
    valid = np.zeros(len(ids), dtype=bool)
    order = [row[cutout.object_id] for cutout in cutouts]
    if order:
        images[order] = prepared.images
        valid[order] = prepared.accepted
    rejects = sorted([*read_rejects, *prepared.rejects], key=lambda r: row[r.object_id])
    reject_rows = [{"id": int(r.object_id), "reason": r.reason, "message": str(r)} for r in rejects]
    stats = {
        "nan_ids": sum(1 for c in kept if c.total_nan_pixels > 0),
        "nan_pixels": int(sum(c.total_nan_pixels for c in kept)),
    }
    write_shard(store_url, item["shard"], images, valid, reject_rows, stats=stats)
    # Rejects travel through the shard's report in the store, not through Ray: only counts come back.
    return {"shard": item["shard"], "written": int(valid.sum()), "rejected": len(reject_rows)}


def ingest(data: DataConfig, preprocess: PreprocessConfig, *, progress: bool = True) -> IngestSummary:
    """Run the whole ingest (resumable) and return its summary. Raises IngestError in strict mode.

    ``progress``: draw a bar counting objects (on a terminal, and not under ``lensray -q``).
    """
    if data.images is None or data.catalog is None or preprocess.out is None:
        raise IngestError("data.images, data.catalog and preprocess.out are all required")
    started = time.perf_counter()
    storage.check_reachable(data.images)
    storage.check_reachable(data.catalog)
    storage.check_reachable(preprocess.out, must_exist=False)
    catalog, labelled, ids, labels = _ids_to_ingest(data, preprocess)
    create_store(
        preprocess.out,
        ids=ids,
        labels=labels,
        split=assign_splits(ids, preprocess.val_fraction, preprocess.test_fraction, preprocess.split_seed),
        channels=len(data.bands),
        size=output_shape(preprocess, data.profile)[0],
        dtype=preprocess.dtype,
        shard_size=preprocess.shard_size,
        meta=_store_meta(data, preprocess, catalog, labelled),
    )
    todo, n_shards = _pending_shards(preprocess.out, ids, preprocess.shard_size)
    results = list(_run_shards(todo, data, preprocess, progress)) if todo else []
    summary_meta = finalize_store(preprocess.out, {"ingest_wall_s": round(time.perf_counter() - started, 3)})
    rejects = summary_meta["rejects"]
    summary = IngestSummary(
        store_url=preprocess.out,
        n_ids=len(ids),
        n_shards=n_shards,
        shards_written=len(results),
        shards_skipped=n_shards - len(todo),
        n_written=int(summary_meta["counts"]["valid"]),
        rejects=rejects,
        excluded_by_label_rule=len(labelled.excluded),
        duplicate_ids=len(catalog.duplicates),
        wall_s=time.perf_counter() - started,
        unlabelled=int((labels == -1).sum()),
    )
    if summary.n_written == 0:
        raise IngestError(f"every cutout was rejected: is {data.images} the right root?\n{summary}")
    if preprocess.strict and rejects:
        raise IngestError(f"--strict: {len(rejects)} cutouts rejected\n{summary}")
    return summary


def _ids_to_ingest(
    data: DataConfig, preprocess: PreprocessConfig
) -> tuple[Catalog, LabelledIDs, np.ndarray, np.ndarray]:
    """The catalogue, its labelling, and the sorted IDs and labels to ingest (the first ``limit``)."""
    assert data.catalog is not None
    catalog = load_catalog(data.catalog, data)
    labelled = label_ids(catalog, data)
    ids, labels = labelled.ids, labelled.labels
    if preprocess.limit is not None:
        ids, labels = ids[: preprocess.limit], labels[: preprocess.limit]
    if len(ids) == 0:
        raise IngestError(f"no IDs to ingest from {data.catalog} under label rule {labelled.rule!r}")
    if labelled.rule == "unlabelled":
        log.warning(
            "catalogue %s has no label column (--label-column) and is not the challenge catalogue: its %d IDs are "
            "stored unlabelled (-1), for scoring; training and evaluation will refuse them",
            data.catalog,
            len(ids),
        )
    return catalog, labelled, ids, labels


def _store_meta(
    data: DataConfig, preprocess: PreprocessConfig, catalog: Catalog, labelled: LabelledIDs
) -> dict[str, Any]:
    """The store's provenance: all of it is part of the resume fingerprint. The challenge catalogue read
    with the default columns gives exactly the meta it always did (so older stores still resume)."""
    meta = {
        "preprocess": preprocess.model_dump(mode="json", exclude={"out", "workers", "strict"}),
        "transform": describe(preprocess, data.profile, data.bands),
        "profile": data.profile.model_dump(mode="json"),  # the layout read; LensStore.profile
        "label_rule": labelled.rule,  # a challenge rule, "column:<name>" or "unlabelled"
        "bands": list(data.bands),
        "nan_policy": data.nan,
        "source": {"images": data.images, "catalog": data.catalog},
        "excluded_by_label_rule": len(labelled.excluded),
        "duplicate_catalog_rows": len(catalog.duplicates),
    }
    columns = data.model_dump(mode="json", include=set(CATALOG_KEYS))
    if columns != DataConfig().model_dump(mode="json", include=set(CATALOG_KEYS)):
        meta["catalog"] = columns
    return meta


def _pending_shards(store_url: str, ids: np.ndarray, shard_size: int) -> tuple[list[dict[str, Any]], int]:
    """The shards not yet complete in the store (one Ray Data row each: index and IDs), and the shard count."""
    ranges = shard_ranges(len(ids), shard_size)
    done = completed_shards(store_url)
    todo = [
        {"shard": index, "ids": [int(i) for i in ids[start:stop]]}
        for index, (start, stop) in enumerate(ranges)
        if index not in done
    ]
    return todo, len(ranges)


def _run_shards(
    todo: list[dict[str, Any]], data: DataConfig, preprocess: PreprocessConfig, show_progress: bool
) -> Iterator[dict[str, Any]]:
    """Process the shards in Ray Data tasks (at most ``preprocess.workers`` at once); yields each one's counts."""
    import ray

    ensure_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts objects
    workers = preprocess.workers or max(1, int(ray.available_resources().get("CPU", 1)))
    dataset = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
        _process_shard,
        fn_kwargs={"data": data, "preprocess": preprocess, "store_url": preprocess.out},
        compute=ray.data.TaskPoolStrategy(size=min(workers, len(todo))),
        num_cpus=1,  # Ray Data retries a task whose worker died; a retried task rewrites its whole shard
    )
    n_objects = sum(len(item["ids"]) for item in todo)
    with runtime.progress(n_objects, "ingest", "obj") if show_progress else contextlib.nullcontext() as bar:
        for row in dataset.iter_rows():
            if bar is not None:
                bar.update(row["written"] + row["rejected"])
            yield row
