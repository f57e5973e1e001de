"""A plain, non-editable install runs `lensray demo` from any working directory: the demo's configs are
package data (lensray/resources), not files of the checkout."""

from __future__ import annotations

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
    tiny = ["--n", "120", "--seed", "5", "--set", "train.epochs=2", "--set", "train.steps_per_epoch=4"]
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
    report = out / "evaluation" / "report.html"
    assert report.is_file() and done.stdout.rstrip().splitlines()[-1] == f"HTML report: {report}"
