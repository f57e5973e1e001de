"""The grades file: every grade saved at once, resumable, mergeable, and turned into a labelled catalogue.

Euclid's visual-inspection scheme: **A** a sure lens, **B** a probable lens, **C** a possible lens, **X** not a
lens. A grade is first appended as one JSON line to ``<stem>_journal.jsonl`` beside the grades file and
fsynced (a crash loses at most the grade being written, and a torn last line is dropped on reopening); then
the Parquet (``GRADE_COLUMNS``, one row per grader and ID, that grader's latest grade) is rebuilt from the
journal and replaced atomically (``storage.write_bytes``: written aside, renamed). Restarting on the same
file reads the journal back and goes on. The journal is the record; the Parquet is what others read.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lensray import storage
from lensray.errors import GradeError, LensrayError

GRADES: dict[str, str] = {"A": "sure lens", "B": "probable lens", "C": "possible lens", "X": "not a lens"}
LENS_GRADES, NON_LENS_GRADES = ("A", "B"), ("X",)  # C is neither: left out of the catalogue
# One row per (grader, id). random_low: the candidate came from the blind random slice below the top
# (an unbiased purity estimate); rank/score/score_std/ra/dec: the candidate as it was shown.
GRADE_COLUMNS: tuple[str, ...] = (
    "id",
    "grader",
    "grade",
    "note",
    "graded_at",
    "random_low",
    "rank",
    "score",
    "score_std",
    "ra",
    "dec",
)
_FLOATS = ("score", "score_std", "ra", "dec")


def journal_path(out: str | Path) -> Path:
    """``grades.parquet`` -> ``grades_journal.jsonl`` (the append-only record beside it)."""
    out = Path(out)
    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(f"{stem}_journal.jsonl")


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def grade_record(
    candidate: dict[str, Any], grade: str, note: str, grader: str, graded_at: str | None = None
) -> dict[str, Any]:
    """One grade as a journal line / Parquet row: the grade, who, when, and the candidate as it was shown."""
    grade = str(grade).upper()
    if grade not in GRADES:
        raise GradeError(f"grade {grade!r} for ID {candidate.get('id')} is not one of {', '.join(GRADES)}")
    record = {
        "id": int(candidate["id"]),
        "grader": grader,
        "grade": grade,
        "note": str(note or ""),
        "graded_at": graded_at or now_utc(),
        "random_low": bool(candidate.get("random_low", False)),
        "rank": int(candidate["rank"]) if candidate.get("rank") is not None else -1,
    }
    for name in _FLOATS:
        value = candidate.get(name)
        record[name] = None if value is None or not np.isfinite(float(value)) else float(value)
    return record


class GradeBook:
    """The grades of one output file: ``add`` appends (fsync) and republishes the Parquet; thread-safe.

    ``out`` must be a local path: a journal needs append and fsync, which object stores do not offer.
    """

    def __init__(self, out: str | Path) -> None:
        if not storage.is_local(str(out)):
            raise GradeError(f"--out {out}: the grades file must be a local path (it is appended to and fsynced)")
        self.out = Path(storage.strip_scheme(str(out)))
        self.journal = journal_path(self.out)
        self._lock = threading.Lock()
        self.latest: dict[tuple[str, int], dict[str, Any]] = {}
        for record in _read_journal(self.journal):
            self.latest[(record["grader"], record["id"])] = record
        if self.latest or self.journal.exists():
            self._publish()  # a crash between the journal and the Parquet: catch the Parquet up

    def add(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        with self._lock:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with open(self.journal, "a", encoding="utf-8") as stream:
                stream.write(line)
                stream.flush()
                os.fsync(stream.fileno())
            self.latest[(record["grader"], record["id"])] = record
            self._publish()

    def grades_of(self, grader: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {object_id: r for (who, object_id), r in self.latest.items() if who == grader}

    def frame(self) -> pd.DataFrame:
        return grades_frame(list(self.latest.values()))

    def _publish(self) -> None:
        storage.write_bytes(str(self.out), parquet_bytes(self.frame()))


def _read_journal(path: Path) -> list[dict[str, Any]]:
    """The journal's records in order. A torn last line (a crash mid-write) is cut off the file, so that the
    next append starts on a line of its own; a bad line elsewhere is an error naming the line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as stream:
            stream.truncate(end)
            os.fsync(stream.fileno())
    records = []
    for number, line in enumerate(raw[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["id"] = int(record["id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise GradeError(f"{path} line {number}: not a grade record ({exc})") from None
        records.append(record)
    return records


def grades_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Records as the grades table: ``GRADE_COLUMNS``, fixed dtypes (NaN where a value is unknown)."""
    frame = pd.DataFrame(list(records), columns=list(GRADE_COLUMNS))
    types = {"id": np.int64, "rank": np.int64, "random_low": bool, **dict.fromkeys(_FLOATS, np.float64)}
    frame = frame.astype({name: kind for name, kind in types.items()})
    for name in ("grader", "grade", "note", "graded_at"):
        frame[name] = frame[name].astype(object)
    return frame.sort_values(["grader", "graded_at"], kind="stable").reset_index(drop=True)


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


def read_grades(url: str) -> pd.DataFrame:
    """A grades Parquet (local or any storage URL), checked: every ``GRADE_COLUMNS`` present, grades A/B/C/X."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        frame = pq.read_table(pa.BufferReader(storage.read_bytes(url))).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError | LensrayError):
            raise
        raise GradeError(f"{url}: not a readable Parquet grades file ({exc})") from None
    missing = [name for name in GRADE_COLUMNS if name not in frame.columns]
    if missing:
        raise GradeError(f"{url}: not a grades file, it lacks the column(s) {', '.join(missing)}")
    bad = sorted(set(frame["grade"]) - set(GRADES))
    if bad:
        raise GradeError(f"{url}: unknown grade(s) {bad}; grades are {', '.join(GRADES)}")
    return grades_frame(frame[list(GRADE_COLUMNS)].to_dict(orient="records"))


@dataclass(frozen=True)
class MergeSummary:
    out_url: str
    rows: int
    graders: dict[str, int]
    replaced: int  # rows dropped because a later grade of the same ID by the same grader exists

    def __str__(self) -> str:
        who = ", ".join(f"{name} {count}" for name, count in sorted(self.graders.items()))
        return f"merged {self.rows} grades ({who}; {self.replaced} superseded by later ones) -> {self.out_url}"


def merge_grades(urls: Sequence[str], out_url: str) -> MergeSummary:
    """Graders' files as one: a later grade (``graded_at``) of one ID by one grader replaces the earlier one
    (on a tie, the file named later wins); different graders' grades of one ID stay as separate rows."""
    frames = [read_grades(url) for url in urls]
    merged = pd.concat(frames, ignore_index=True)
    merged = merged.sort_values("graded_at", kind="stable")
    kept = merged.drop_duplicates(["grader", "id"], keep="last")
    out = grades_frame(kept.to_dict(orient="records"))
    storage.write_bytes(out_url, parquet_bytes(out))
    return MergeSummary(out_url, len(out), out["grader"].value_counts().to_dict(), len(merged) - len(kept))


@dataclass(frozen=True)
class CatalogSummary:
    out_url: str
    lenses: int
    non_lenses: int
    excluded_c: int  # IDs graded C only (by every grader who graded them, or ties of C with nothing else)
    excluded_split: int  # IDs whose graders split evenly between lens and non-lens

    def __str__(self) -> str:
        return (
            f"{self.lenses + self.non_lenses} labelled IDs ({self.lenses} lenses from A/B, {self.non_lenses} "
            f"non-lenses from X) -> {self.out_url}; left out: {self.excluded_c} graded C only, "
            f"{self.excluded_split} with graders split evenly\n"
            f"  ingest: lensray preprocess --catalog {self.out_url} --label-column label --images ROOT --out STORE"
        )


def grades_to_catalog(grades_url: str, out_url: str) -> CatalogSummary:
    """A labelled catalogue (Parquet: ``ID``, ``label`` 1/0, ``ra``/``dec`` when known) from a grades file.

    Each grader's latest grade of an ID is one vote: A/B for a lens, X against, C none. An ID is a lens
    when its lens votes outnumber the others, a non-lens when the X votes do; an ID with only C votes, or
    an even split, is left out. ``lensray preprocess --catalog OUT --label-column label`` ingests it."""
    grades = read_grades(grades_url)
    grades = grades.sort_values("graded_at", kind="stable").drop_duplicates(["grader", "id"], keep="last")
    votes = grades.assign(
        lens=grades["grade"].isin(LENS_GRADES).astype(int), non=grades["grade"].isin(NON_LENS_GRADES).astype(int)
    )
    per_id = votes.groupby("id", sort=True).agg(lens=("lens", "sum"), non=("non", "sum"), ra=("ra", "max"))
    per_id["dec"] = votes.groupby("id", sort=True)["dec"].max()
    decided = per_id[per_id["lens"] != per_id["non"]]
    catalog = pd.DataFrame(
        {"ID": decided.index.to_numpy(np.int64), "label": (decided["lens"] > decided["non"]).to_numpy(np.int8)}
    )
    if decided["ra"].notna().any():
        catalog["ra"], catalog["dec"] = decided["ra"].to_numpy(), decided["dec"].to_numpy()
    storage.write_bytes(out_url, parquet_bytes(catalog))
    undecided = per_id[per_id["lens"] == per_id["non"]]
    only_c = int(((undecided["lens"] == 0) & (undecided["non"] == 0)).sum())
    return CatalogSummary(
        out_url,
        lenses=int(catalog["label"].sum()),
        non_lenses=int((catalog["label"] == 0).sum()),
        excluded_c=only_c,
        excluded_split=len(undecided) - only_c,
    )
