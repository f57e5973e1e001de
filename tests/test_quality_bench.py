"""benchmarks/quality.py's analysis: per-bin AUC says which lenses a network misses (README "make quality")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bench_module import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality.py", "quality_bench")


def _write_set(root: Path, n: int = 200) -> tuple[Path, Path]:
    """A simulated set's truth and catalogue, and an evaluation that finds only lenses with large arcs."""
    rng = np.random.default_rng(0)
    ids = np.arange(200001, 200001 + n)
    is_lens = np.arange(n) % 2
    theta_e = rng.uniform(0.3, 2.5, n)
    arc_pixels = np.where(is_lens == 1, rng.choice([40, 900], n), 0)
    data, evaluation = root / "data", root / "evaluation"
    data.mkdir()
    evaluation.mkdir()
    truth = ["ID,is_lens,theta_e"] + [f"{i},{y},{t:.3f}" for i, y, t in zip(ids, is_lens, theta_e, strict=True)]
    (data / "truth.csv").write_text("\n".join(truth) + "\n")
    catalogue = ["# a comment line, as the simulator writes", ",ID,n_pix_source"]
    catalogue += [f"{k},{i},{p}" for k, (i, p) in enumerate(zip(ids, arc_pixels, strict=True))]
    (data / "image_catalog2.0train.csv").write_text("\n".join(catalogue) + "\n")
    # Large arcs score above every non-lens; small arcs are drawn like non-lenses.
    score = np.where(arc_pixels > 500, 0.9 + rng.uniform(0, 0.1, n), rng.uniform(0, 0.8, n))
    rows = ["id,label,score"] + [f"{i},{y},{s:.4f}" for i, y, s in zip(ids, is_lens, score, strict=True)]
    (evaluation / "predictions.csv").write_text("\n".join(rows) + "\n")
    return data, evaluation


def test_per_bin_auc_separates_found_from_missed_lenses(quality, tmp_path: Path) -> None:
    data, evaluation = _write_set(tmp_path)
    properties = quality.lens_properties(data)
    assert properties[200002]["n_pix_source"] in (40.0, 900.0) and 0.3 <= properties[200002]["theta_e"] <= 2.5
    by_bin = quality.auc_by_lens_bin(evaluation, properties)
    assert by_bin["n_pix_source 500-inf"] == pytest.approx(1.0)
    assert 0.3 < by_bin["n_pix_source 0-80"] < 0.7  # missed: scored like the non-lenses
    assert "n_pix_source 200-500" not in by_bin  # no lens there: no figure rather than a made-up one
    assert all(key in by_bin for key in ("theta_e 0-0.6", "theta_e 1.6-inf"))
    table = quality.lens_bin_markdown(
        [quality.Row("lastro", "challenge", 0, 60.0, {"auc": 0.8}, {"auc": 0.7}, {}, by_bin)]
    )
    assert "| lastro | challenge | 0 |" in table and "1.000" in table
