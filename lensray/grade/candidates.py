"""What to grade, in which order: the candidates ``lensray score`` wrote, ordered for a person.

Orders: ``score`` (best first, the default), ``uncertainty`` (active learning: the members' spread
``score_std`` largest first when the candidates carry it, else the scores closest to 0.5 first), ``mix``
(one from each order in turn, each candidate once). ``top`` keeps the first K of the order. ``random_low``
adds N candidates drawn at random (seeded) from those ranked below the top K by score, for an unbiased
purity estimate; they are shuffled in among the others so that a grader cannot tell them apart, and marked
``random_low`` in the grades file. The order depends only on the file and these options, so a restart
shows the same sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from lensray import storage
from lensray.errors import GradeError

Order = Literal["score", "uncertainty", "mix"]
ORDERS: tuple[str, ...] = ("score", "uncertainty", "mix")
REQUIRED = ("id", "score")
SHOWN = ("rank", "id", "score", "score_std", "ra", "dec")


def read_candidates(url: str) -> pd.DataFrame:
    """The candidates Parquet of ``lensray score`` (rank, id, score; optional score_std, ra, dec, kept columns).
    Without ``rank`` the rows are ranked by score here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        frame = pq.read_table(pa.BufferReader(storage.read_bytes(url))).to_pandas()
    except pa.ArrowInvalid as exc:
        raise GradeError(f"--candidates {url}: not a readable Parquet file ({exc})") from None
    missing = [name for name in REQUIRED if name not in frame.columns]
    if missing:
        raise GradeError(f"--candidates {url}: no column(s) {', '.join(missing)} (a `lensray score` output has them)")
    if frame["id"].duplicated().any():
        repeated = frame.loc[frame["id"].duplicated(), "id"].head(5).tolist()
        raise GradeError(f"--candidates {url}: repeated IDs, e.g. {repeated}")
    frame = frame.astype({"id": np.int64, "score": np.float64})
    if "rank" not in frame.columns:
        frame = frame.sort_values(["score", "id"], ascending=[False, True], kind="stable").reset_index(drop=True)
        frame.insert(0, "rank", np.arange(1, len(frame) + 1))
    return frame.sort_values("rank", kind="stable").reset_index(drop=True)


def score_summary(candidates_url: str) -> dict[str, Any]:
    """``<stem>_summary.json`` beside the candidates (the images URL and bands they were scored from), or {}."""
    stem = candidates_url[: -len(".parquet")] if candidates_url.endswith(".parquet") else candidates_url
    try:
        return json.loads(storage.read_bytes(f"{stem}_summary.json"))
    except (FileNotFoundError, ValueError):
        return {}


def _by_uncertainty(frame: pd.DataFrame) -> np.ndarray:
    if "score_std" in frame.columns and frame["score_std"].notna().any():
        key = -frame["score_std"].fillna(-np.inf).to_numpy()
    else:
        key = np.abs(frame["score"].to_numpy() - 0.5)
    return np.lexsort((frame["rank"].to_numpy(), key))  # ties: the better-ranked first


def _alternate(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    seen: set[int] = set()
    out = []
    for pair in zip(first, second, strict=True):
        for index in pair:
            if int(index) not in seen:
                seen.add(int(index))
                out.append(int(index))
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class Selection:
    """The candidates to grade, in order (``random_low`` marks the blind random slice)."""

    frame: pd.DataFrame
    order: str
    top: int
    random_low: int

    def describe(self) -> str:
        slice_ = f" + {self.random_low} random from below the top {self.top}" if self.random_low else ""
        return f"{len(self.frame) - self.random_low} candidates by {self.order}{slice_}"


def select(
    candidates: pd.DataFrame, order: str = "score", top: int | None = None, random_low: int = 0, seed: int = 0
) -> Selection:
    """The grading sequence (see the module's docstring)."""
    if order not in ORDERS:
        raise GradeError(f"--order {order!r}: choose one of {', '.join(ORDERS)}")
    if (top is not None and top < 1) or random_low < 0:
        raise GradeError(f"--top must be at least 1 and --random-low at least 0 (got {top}, {random_low})")
    by_score = np.arange(len(candidates))  # read_candidates sorts by rank
    if order == "score":
        index = by_score
    elif order == "uncertainty":
        index = _by_uncertainty(candidates)
    else:
        index = _alternate(by_score, _by_uncertainty(candidates))
    if random_low and top is None:
        raise GradeError("--random-low N needs --top K: the random slice is drawn from the candidates below the top K")
    chosen = index[: top or len(index)]
    frame = candidates.iloc[chosen].assign(random_low=False)
    if random_low:
        worst_chosen = candidates["rank"].to_numpy()[chosen].max()
        pool = np.flatnonzero(candidates["rank"].to_numpy() > worst_chosen)
        if len(pool) < random_low:
            raise GradeError(f"--random-low {random_low}: only {len(pool)} candidates rank below the top {top}")
        rng = np.random.default_rng(seed)
        low = candidates.iloc[np.sort(rng.choice(pool, random_low, replace=False))].assign(random_low=True)
        at = np.sort(rng.choice(len(frame) + random_low, random_low, replace=False))  # their places, blind
        rows = list(frame.itertuples(index=False))
        for position, row in zip(at, low.itertuples(index=False), strict=True):
            rows.insert(int(position), row)
        frame = pd.DataFrame(rows, columns=frame.columns)
    return Selection(frame.reset_index(drop=True), order, top or len(index), random_low)


def shown(row: dict[str, Any]) -> dict[str, Any]:
    """A candidate as the page gets it: plain JSON numbers, None for what is missing."""
    out: dict[str, Any] = {"random_low": bool(row.get("random_low", False))}
    for name in SHOWN:
        value = row.get(name)
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            out[name] = None
        else:
            out[name] = int(value) if name in ("rank", "id") else float(value)
    return out
