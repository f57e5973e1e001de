"""``lensray report-loop``: purity per round (fresh, whole top N, true, never graded), the ranking's changes,
and one-line errors naming the file. Tiny synthetic rounds: candidates written with pandas, grades through
the grades-file API a person's page uses. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from lensray.cli import main
from lensray.grade.grades import GradeBook, grade_record
from lensray.grade.report import loop_report, ranking_change, verdicts

LENSES = {1, 2, 5, 7, 9}  # the truth of IDs 1..12


def write_round(folder: Path, order: list[int], grades: dict[int, str], grader: str = "ana") -> None:
    """A round: candidates ranked as ``order`` (best first), and ``grades`` written through GradeBook."""
    folder.mkdir(parents=True)
    scores = np.linspace(0.99, 0.01, len(order))
    frame = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "id": order, "score": scores})
    frame.to_parquet(folder / "candidates.parquet", index=False)
    book = GradeBook(folder / "grades.parquet")
    by_id = frame.set_index("id")
    for object_id, grade in grades.items():
        candidate = {"id": object_id, "rank": int(by_id.loc[object_id, "rank"]), "score": by_id.loc[object_id, "score"]}
        book.add(grade_record(candidate, grade, "", grader))


@pytest.fixture
def rounds(tmp_path: Path) -> list[Path]:
    """Round 0 grades its top 4; round 1 ranks the graded lenses first and grades the next 4 fresh ones."""
    first, second = tmp_path / "round0", tmp_path / "round1"
    write_round(first, [1, 3, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12], {1: "A", 3: "X", 2: "B", 4: "C"})
    write_round(second, [1, 2, 5, 7, 3, 9, 4, 6, 8, 10, 11, 12], {5: "A", 7: "A", 9: "B", 6: "X"})
    truth = pd.DataFrame({"ID": range(1, 13), "is_lens": [int(i in LENSES) for i in range(1, 13)]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    return [first, second]


def test_purity_per_round_fresh_whole_top_and_true(rounds: list[Path], tmp_path: Path) -> None:
    report = loop_report([str(r) for r in rounds], str(tmp_path / "out"), top=4, truth_url=str(tmp_path / "truth.csv"))
    zero, one = report.rounds
    # Round 0: top 4 = 1,3,2,4 all fresh and graded: A, X, B, C -> 2 of 4 (C is not a lens).
    assert (zero["graded"], zero["graded_fresh"], zero["graded_purity_fresh"]) == (4, 4, 0.5)
    assert zero["graded_purity_top"] == 0.5 and zero["true_purity_top"] == 0.5
    # Round 1: top 4 = 1,2,5,7 (all lenses; 1 and 2 known from round 0). Fresh top 4 = 5,7,9,6 -> 3 of 4.
    assert one["graded_purity_top"] == 1.0 and one["graded_top"] == 4
    assert (one["graded_fresh"], one["graded_purity_fresh"], one["true_purity_fresh"]) == (4, 0.75, 0.75)
    assert one["true_purity_top"] == 1.0
    # Never graded by any round: 8, 10, 11, 12 -> no lens among them in either round.
    assert zero["true_purity_never_graded"] == 0.0 == one["true_purity_never_graded"]
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [row["graded_purity_fresh"] for row in written["rounds"]] == [0.5, 0.75]
    assert (tmp_path / "out" / "purity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "| round1 | 12 | 4 | 75 % of 4 | 100 % of 4 | 75 % | 0 % | 100 % |"
        in (tmp_path / "out" / "report.md").read_text()
    )


def test_ranking_change_overlap_spearman_entered_left(rounds: list[Path], tmp_path: Path) -> None:
    report = loop_report([str(r) for r in rounds], str(tmp_path / "out"), top=4)
    (change,) = report.changes
    assert change["overlap"] == 0.5  # 1 and 2 stay in the top 4
    assert change["entered"] == [5, 7] and change["left"] == [3, 4]
    before = [1, 3, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    after = [1, 2, 5, 7, 3, 9, 4, 6, 8, 10, 11, 12]
    ids = sorted(before)
    expected = spearmanr([before.index(i) for i in ids], [after.index(i) for i in ids]).statistic
    assert change["spearman"] == pytest.approx(expected) and change["common_ids"] == 12
    assert "true_purity_top" not in report.rounds[0]  # no truth given, no true figures


def test_spearman_only_over_the_ids_both_rounds_scored() -> None:
    change = ranking_change(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 9]), top=2)
    assert change["common_ids"] == 3 and change["spearman"] == pytest.approx(-1.0)
    assert change["overlap"] == 0.0 and change["entered"] == [4, 3] and change["left"] == [1, 2]


def test_a_verdict_is_the_majority_of_each_graders_latest_grade(tmp_path: Path) -> None:
    book = GradeBook(tmp_path / "g.parquet")
    for grader, object_id, grade, when in (
        ("ana", 1, "X", "2026-01-01"),
        ("ana", 1, "A", "2026-01-02"),  # replaces ana's X
        ("ben", 1, "B", "2026-01-01"),
        ("ana", 2, "A", "2026-01-01"),
        ("ben", 2, "X", "2026-01-01"),  # even split: not a lens
        ("ana", 3, "C", "2026-01-01"),
    ):
        book.add(grade_record({"id": object_id}, grade, "", grader, graded_at=when))
    assert verdicts(book.frame()).to_dict() == {1: True, 2: False, 3: False}


def test_bad_input_is_one_line_naming_the_file(
    rounds: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "round2"
    empty.mkdir()
    assert main(["report-loop", *map(str, rounds), str(empty), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert (
        error.count("\n") == 0
        and error.startswith("lensray report-loop: ")
        and str(empty / "candidates.parquet") in error
    )
    (rounds[1] / "grades.parquet").write_text("not parquet")
    assert main(["report-loop", *map(str, rounds), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert (
        error.count("\n") == 0
        and error.startswith("lensray report-loop: ")
        and str(rounds[1] / "grades.parquet") in error
    )
    truth = tmp_path / "t.csv"
    truth.write_text("ID,label\n1,1\n")
    assert main(["report-loop", str(rounds[0]), "--out", str(tmp_path / "out"), "--truth", str(truth)]) == 1
    error = capsys.readouterr().err.strip()
    assert (
        error.count("\n") == 0
        and error.startswith("lensray report-loop: ")
        and str(truth) in error
        and "is_lens" in error
    )


def test_the_command_prints_the_purity_per_round(
    rounds: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    truth = str(tmp_path / "truth.csv")
    assert main(["report-loop", *map(str, rounds), "--out", str(tmp_path / "out"), "--top", "4", "--truth", truth]) == 0
    printed = capsys.readouterr().out
    assert "round0: graded 4, fresh 50 %" in printed and "round1: graded 4, fresh 75 %, true fresh 75 %" in printed


def test_a_round_not_graded_yet_has_no_graded_purity_but_its_true_one(rounds: list[Path], tmp_path: Path) -> None:
    latest = tmp_path / "round2"
    latest.mkdir()
    order = [9, 5, 1, 2, 7, 3, 4, 6, 8, 10, 11, 12]
    pd.DataFrame({"id": order, "score": np.linspace(0.9, 0.1, 12)}).to_parquet(latest / "candidates.parquet")
    report = loop_report(
        [*map(str, rounds), str(latest)], str(tmp_path / "out"), top=2, truth_url=str(tmp_path / "truth.csv")
    )
    row = report.rounds[2]
    assert (row["graded"], row["graded_fresh"], row["graded_purity_fresh"]) == (0, 0, None)
    assert row["true_purity_top"] == 1.0  # 9 and 5, both lenses (ranked by score: the file has no rank)
    assert row["true_purity_fresh"] == 0.0  # every lens was graded before: the fresh top 2 are 8 and 10
