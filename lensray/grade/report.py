"""The discovery loop's report: purity per round and how the ranking changed (``lensray report-loop``).

A round is one folder: ``candidates.parquet`` (what ``lensray score --out ROUND/candidates.parquet`` wrote)
and ``grades.parquet`` (what ``lensray grade --out ROUND/grades.parquet`` wrote; a round not graded yet has
none). Rounds are given oldest first. An ID's verdict is the majority of its graders' latest grades: a lens
when more than half are A or B (C and X count against), as a person would quote purity.

Per round, with N = ``top``:
- **fresh top N**: the first N candidates not graded in an earlier round. Graded objects are known (and were
  trained on), so they rank right trivially; the purity of the fresh top N is the honest figure of a round.
  ``graded_purity_fresh``: lenses among the fresh top N graded in this round.
- ``graded_purity_top``: lenses among the top N graded in this or any earlier round (inflated by the latter).
- with ``truth`` (a table of ID and is_lens, e.g. the simulator's ``truth.csv``): ``true_purity_top``,
  ``true_purity_fresh``, and ``true_purity_never_graded``: the top N among the IDs that no round of the
  report graded, the same pool for every round, so the rounds compare like for like.
- against the round before: ``overlap`` (share of the top N in both), ``spearman`` (rank correlation over the
  IDs both scored), ``entered`` / ``left`` (IDs that came into / dropped out of the top N).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

from lensray import storage
from lensray.errors import GradeError
from lensray.grade.candidates import read_candidates
from lensray.grade.grades import LENS_GRADES, read_grades

CANDIDATES_NAME, GRADES_NAME = "candidates.parquet", "grades.parquet"
REPORT_FILES = ("report.md", "report.json", "purity.png")
PURITY_KEYS = (
    "graded_purity_fresh",
    "graded_purity_top",
    "true_purity_fresh",
    "true_purity_never_graded",
    "true_purity_top",
)


@dataclass(frozen=True)
class Round:
    """One round: its folder, its ranking (scored IDs, best first) and each graded ID's verdict (True: lens)."""

    name: str
    folder: str
    ranking: np.ndarray  # int64 IDs, best first; rejects (no score) left out
    verdicts: pd.Series  # id -> bool; empty when the round is not graded


def verdicts(grades: pd.DataFrame) -> pd.Series:
    """id -> lens or not: each grader's latest grade is one vote; a lens when A/B are more than half."""
    latest = grades.sort_values("graded_at", kind="stable").drop_duplicates(["grader", "id"], keep="last")
    share = latest.assign(lens=latest["grade"].isin(LENS_GRADES)).groupby("id")["lens"].mean()
    return (share > 0.5).rename("lens")


def read_round(folder: str) -> Round:
    """A round folder: its candidates (required) and grades (optional), each error naming the file."""
    candidates_url, grades_url = storage.join(folder, CANDIDATES_NAME), storage.join(folder, GRADES_NAME)
    if not storage.exists(candidates_url):
        raise GradeError(f"round {folder}: no {candidates_url} (`lensray score --out {candidates_url}` writes it)")
    candidates = read_candidates(candidates_url)
    ranking = candidates.loc[candidates["score"].notna(), "id"].to_numpy(np.int64)
    graded = verdicts(read_grades(grades_url)) if storage.exists(grades_url) else pd.Series(dtype=bool, name="lens")
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    return Round(name, folder, ranking, graded)


def read_truth(url: str, id_column: str = "ID", column: str = "is_lens") -> pd.Series:
    """id -> is a lens, from a CSV or Parquet table (1/0 or true/false)."""
    data = storage.read_bytes(url)
    try:
        parquet = url.lower().endswith((".parquet", ".parq", ".pq"))
        table = pd.read_parquet(io.BytesIO(data)) if parquet else pd.read_csv(io.BytesIO(data), comment="#")
    except (ValueError, OSError) as exc:
        raise GradeError(f"--truth {url}: not a readable CSV or Parquet table ({exc})") from None
    missing = [name for name in (id_column, column) if name not in table.columns]
    if missing:
        raise GradeError(f"--truth {url}: no column(s) {', '.join(missing)} (choose with --truth-column)")
    values = table[column].astype(str).str.strip().str.lower()
    bad = ~values.isin(["1", "0", "true", "false", "1.0", "0.0"])
    if bad.any():
        raise GradeError(
            f"--truth {url}: column {column} must be 1/0 or true/false; ID {table[id_column][bad].iloc[0]}"
        )
    return pd.Series(values.isin(["1", "true", "1.0"]).to_numpy(), index=table[id_column].astype(np.int64), name=column)


def purity(ids: Sequence[int] | np.ndarray, lens: pd.Series) -> tuple[float | None, int]:
    """The share of ``ids`` that ``lens`` calls a lens, among those it knows, and how many it knows."""
    known = lens.reindex(np.asarray(ids, dtype=np.int64)).dropna()
    return (float(known.astype(bool).mean()) if len(known) else None), len(known)


def ranking_change(before: np.ndarray, after: np.ndarray, top: int) -> dict[str, Any]:
    """How the ranking moved: top-N overlap, Spearman over the IDs both ranked, IDs that entered / left."""
    from scipy.stats import spearmanr

    old, new = before[:top], after[:top]
    common = np.intersect1d(before, after)
    rho = None
    if len(common) >= 2:
        position_before = pd.Series(np.arange(len(before)), index=before)[common].to_numpy()
        position_after = pd.Series(np.arange(len(after)), index=after)[common].to_numpy()
        rho = float(spearmanr(position_before, position_after).statistic)
    return {
        "overlap": len(np.intersect1d(old, new)) / max(min(len(old), len(new)), 1),
        "spearman": rho,
        "common_ids": len(common),
        "entered": [int(i) for i in new if i not in set(old.tolist())],
        "left": [int(i) for i in old if i not in set(new.tolist())],
    }


def round_figures(
    rounds: Sequence[Round], k: int, top: int, truth: pd.Series | None, never: np.ndarray
) -> dict[str, Any]:
    """Round k's purities (see the module's docstring)."""
    current = rounds[k]
    earlier = pd.concat([r.verdicts for r in rounds[:k]]) if k else pd.Series(dtype=bool)
    known = pd.concat([earlier, current.verdicts])
    known = known[~known.index.duplicated(keep="last")]
    fresh = current.ranking[~np.isin(current.ranking, earlier.index.to_numpy(np.int64))][:top]
    row: dict[str, Any] = {"round": current.name, "folder": current.folder, "scored": len(current.ranking)}
    row["graded"] = len(current.verdicts)
    row["graded_purity_fresh"], row["graded_fresh"] = purity(fresh, current.verdicts)
    row["graded_purity_top"], row["graded_top"] = purity(current.ranking[:top], known)
    if truth is not None:
        for key, ids in (
            ("top", current.ranking[:top]),
            ("fresh", fresh),
            ("never_graded", current.ranking[np.isin(current.ranking, never)][:top]),
        ):
            absent = np.setdiff1d(ids, truth.index.to_numpy())
            if len(absent):
                raise GradeError(f"--truth has no row for ID {absent[0]} (in the top {top} of {current.folder})")
            row[f"true_purity_{key}"] = purity(ids, truth)[0]
    return row


@dataclass
class LoopReport:
    top: int
    rounds: list[dict[str, Any]]
    changes: list[dict[str, Any]] = field(default_factory=list)
    truth: str | None = None
    out: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"top": self.top, "truth": self.truth, "rounds": self.rounds, "changes": self.changes}

    def __str__(self) -> str:
        lines = [f"purity in the top {self.top} per round (fresh: not graded in an earlier round):"]
        for row in self.rounds:
            cells = [f"graded {row['graded']}", f"fresh {_pct(row['graded_purity_fresh'])}"]
            if "true_purity_fresh" in row:
                cells += [f"true fresh {_pct(row['true_purity_fresh'])}"]
                cells += [f"true never-graded {_pct(row['true_purity_never_graded'])}"]
            lines.append(f"  {row['round']}: " + ", ".join(cells))
        written = ", ".join(storage.join(self.out, name) for name in REPORT_FILES)
        return "\n".join([*lines, f"written: {written}"])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def loop_report(
    folders: Sequence[str],
    out: str,
    top: int = 100,
    truth_url: str | None = None,
    truth_column: str = "is_lens",
) -> LoopReport:
    """Read the rounds (oldest first), compute the figures, write report.md, report.json and purity.png."""
    if top < 1:
        raise GradeError(f"--top must be at least 1 (got {top})")
    rounds = [read_round(folder) for folder in folders]
    truth = read_truth(truth_url, column=truth_column) if truth_url else None
    graded_anywhere = np.unique(np.concatenate([r.verdicts.index.to_numpy(np.int64) for r in rounds]))
    scored = np.unique(np.concatenate([r.ranking for r in rounds]))
    never = np.setdiff1d(scored, graded_anywhere)
    report = LoopReport(top, [round_figures(rounds, k, top, truth, never) for k in range(len(rounds))])
    report.changes = [
        {"from": a.name, "to": b.name, **ranking_change(a.ranking, b.ranking, top)} for a, b in pairwise(rounds)
    ]
    report.truth, report.out = truth_url, out
    storage.write_bytes(storage.join(out, "report.json"), json.dumps(report.as_json(), indent=1).encode())
    storage.write_bytes(storage.join(out, "report.md"), markdown(report).encode())
    storage.write_bytes(storage.join(out, "purity.png"), purity_png(report))
    return report


def markdown(report: LoopReport) -> str:
    has_truth = any("true_purity_top" in row for row in report.rounds)
    head = ["round", "scored", "graded", f"graded purity, fresh top {report.top}", f"graded purity, top {report.top}"]
    head += ["true, fresh", "true, never graded", "true, top"] if has_truth else []
    lines = [f"# The discovery loop: {len(report.rounds)} rounds, top {report.top}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report.rounds:
        cells = [row["round"], str(row["scored"]), str(row["graded"])]
        cells += [f"{_pct(row['graded_purity_fresh'])} of {row['graded_fresh']}"]
        cells += [f"{_pct(row['graded_purity_top'])} of {row['graded_top']}"]
        if has_truth:
            cells += [_pct(row[f"true_purity_{key}"]) for key in ("fresh", "never_graded", "top")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Fresh: the first N candidates not graded in an earlier round (the honest figure: graded objects"]
    lines += ["rank right trivially). Never graded: the top N among the IDs no round graded, the same pool for"]
    lines += ["every round. An ID is a lens when more than half of its graders' latest grades are A or B.", ""]
    if report.changes:
        lines += [f"## Ranking changes (top {report.top})", ""]
        lines += ["| from | to | top-N overlap | Spearman (common IDs) | entered | left |", "|---|---|---|---|---|---|"]
        for change in report.changes:
            rho = "-" if change["spearman"] is None else f"{change['spearman']:.3f} ({change['common_ids']})"
            lines.append(
                f"| {change['from']} | {change['to']} | {100 * change['overlap']:.0f} % | {rho} | "
                f"{len(change['entered'])} | {len(change['left'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def purity_png(report: LoopReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    names = [row["round"] for row in report.rounds]
    figure, axes = plt.subplots(figsize=(6, 4))
    for key in PURITY_KEYS:
        values = [row.get(key) for row in report.rounds]
        if any(value is not None for value in values):
            plotted = [np.nan if value is None else value for value in values]
            style = "--" if key.startswith("true") else "-"  # truth dashed: it often lies on the graded line
            axes.plot(names, plotted, style, marker="o", label=key.replace("_", " "))
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("round")
    axes.set_ylabel(f"purity in the top {report.top}")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    sink = io.BytesIO()
    figure.savefig(sink, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return sink.getvalue()
