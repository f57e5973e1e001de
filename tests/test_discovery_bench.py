"""benchmarks/discovery_loop.py's comparison of the loop with its control (README "The discovery loop")."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from bench_module import load_benchmark


@pytest.fixture(scope="module")
def loop_bench():
    return load_benchmark("discovery_loop.py", "discovery_bench")


def _candidates(path: Path, ids: list[int]) -> Path:
    """A ranked candidates file (best first) with one reject (NaN score) at the top, as ``score`` leaves none."""
    frame = pd.DataFrame({"id": [999, *ids], "score": [float("nan"), *[1.0 - i / 100 for i in range(len(ids))]]})
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path


def test_fresh_purity_skips_earlier_grades_and_rejects(loop_bench, tmp_path: Path) -> None:
    truth = {i: i % 2 == 0 for i in range(1, 11)} | {999: True}
    ranked = _candidates(tmp_path / "c.parquet", [2, 4, 1, 6, 3, 8, 5])
    assert loop_bench.fresh_purity(ranked, set(), truth, 4) == 0.75  # 2, 4, 1, 6
    assert loop_bench.fresh_purity(ranked, {2, 4}, truth, 4) == 0.5  # 1, 6, 3, 8


def test_control_comparison_uses_one_never_graded_pool(loop_bench, tmp_path: Path) -> None:
    plan = loop_bench.parse(["--out", str(tmp_path), "--top", "2", "--control"])
    truth = {i: i <= 4 for i in range(1, 11)}
    round_dir = tmp_path / "rounds" / "round1"
    _candidates(round_dir / "candidates.parquet", [1, 2, 3, 9, 10])  # graded: 1, 2
    _candidates(round_dir / "control_candidates.parquet", [1, 9, 2, 10, 3])
    rows = [{"round": "round1", "loop": 1.0, "control": 0.5}]
    loop_bench.compare_control(plan, rows, truth, graded={1, 2})
    saved = json.loads((tmp_path / "control.json").read_text())
    assert saved == [
        {"round": "round1", "loop": 1.0, "control": 0.5, "loop_never_graded": 0.5, "control_never_graded": 0.0}
    ]
