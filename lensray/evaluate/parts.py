"""The streamed results of a scoring job, resumable: the catalogue cut into parts (``PartPlan``), one Parquet
file each, written whole by the actor that scored it (``write_part``) and read back part by part by the
driver (``read_parts``). ``plan_parts`` resumes the parts of an earlier run of the same job (same
``score_fingerprint``: weights, transform, images, NaN policy, TTA, IDs) and refuses another job's.
No Ray here: ``score.py`` drives the actors that write the parts.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lensray import storage
from lensray.errors import ScoreError
from lensray.evaluate.score_inputs import ScoreInputs, profile_entry

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
        **profile_entry(inputs),
    }


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
