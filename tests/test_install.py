"""A plain, non-editable install runs `lensray demo` from any working directory: the demo's configs are
package data (lensray/resources), not files of the checkout. This is the suite's one end-to-end demo run
(~2-3 min): it also checks every output of the demo (what test_cli's in-process demo test checked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the Dockerfile copies to build the package: no configs/ or tune_configs/ beside it.
SOURCES = ("pyproject.toml", "README.md", "lensray")


@pytest.mark.slow
def test_demo_runs_from_a_non_editable_install(tmp_path: Path) -> None:
    source, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    source.mkdir()
    elsewhere.mkdir()
    for name in SOURCES:  # a copy, so that the build's own folders (build/, *.egg-info) stay out of the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--target", str(target), str(source)],
        check=True,
        cwd=tmp_path,
    )
    assert (target / "lensray" / "resources" / "demo.yaml").is_file()
    assert (target / "lensray" / "resources" / "demo_search.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("RAY_ADDRESS", None)  # the demo starts its own local Ray

    imported = subprocess.run(
        [sys.executable, "-c", "import lensray.demo as d; print(d.__file__); print(d.DEMO_CONFIG)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    )
    assert imported.returncode == 0, imported.stderr
    where = imported.stdout.split()
    assert len(where) == 2 and all(Path(path).is_relative_to(target) for path in where), where

    out = elsewhere / "demo"
    tiny = ["--n", "160", "--seed", "5", "--set", "train.epochs=2", "--set", "train.steps_per_epoch=5"]
    tiny += ["--set", "train.sanity_samples=16"]
    done = subprocess.run(
        [sys.executable, "-m", "lensray", "demo", "--out", str(out), *tiny],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    _assert_demo_outputs(out, done.stdout)


def _assert_demo_outputs(out: Path, printed: str) -> None:
    """Every step's output of the demo run above (``--n 160``, 2 epochs of 5 steps) and what it printed."""
    assert (out / "preview.png").stat().st_size > 50_000
    assert (out / "config.yaml").exists() and (out / "store.zarr").exists()
    assert len(json.loads((out / "runs" / "demo-lastro" / "history.json").read_text())) == 2
    for expected in ("paper", "official", "challenge", "preview grid:", "lensray store", "val_auc", "demo finished"):
        assert expected in printed
    # Step 7: the Table-I-style comparison of the trained run and every search trial, embedded in the report.
    rows = json.loads((out / "compare" / "compare.json").read_text())["rows"]
    assert rows[0]["name"] == "demo-lastro (step 5)" and rows[0]["train_images"] == 2 * 5 * 32
    assert len(rows) >= 2 and all(row["name"].startswith("trial ") for row in rows[1:])
    assert all(0.0 <= row["auc"] <= 1.0 for row in rows)
    report = out / "evaluation" / "report.html"
    assert report.is_file() and printed.rstrip().splitlines()[-1] == f"HTML report: {report}"
    html = report.read_text()
    assert "Runs compared" in html and "demo-lastro (step 5)" in html and "Highest-scored non-lenses" in html
    # Step 8 reports the demo's best model by validation AUC: step 5's run or a trial, whichever is higher.
    histories = [
        json.loads(h.read_text())
        for h in [*(out / "runs").rglob("history.json"), *(out / "tune").rglob("history.json")]
    ]
    assert len(histories) >= 3, "step 5's run and at least two trials"
    best_val_auc = max(epoch["val_auc"] for history in histories for epoch in history)
    evaluated = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert evaluated["run_metrics"]["val_auc"] == pytest.approx(best_val_auc)
    assert "Evaluate the best run by validation AUC" in printed
