"""The `lensray` command end to end: flags become config keys, errors are clear, the demo runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lensray import storage
from lensray.cli import main
from lensray.sky.catalog import CATALOG_NAME, read_catalog


def test_simulate_writes_local_and_s3(
    tmp_path: Path, s3_bucket: str, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "simulate",
                "--out",
                str(tmp_path / "raw"),
                "--n",
                "6",
                "--seed",
                "3",
                "--lens-fraction",
                "0.5",
                "--workers",
                "1",
                "--set",
                "simulate.duplicate_id_rate=0",
                "--set",
                "simulate.missing_image_rate=0",
            ]
        )
        == 0
    )
    assert "simulated 6 objects (3 lenses)" in capsys.readouterr().out
    assert len(read_catalog(str(tmp_path / "raw" / CATALOG_NAME))) == 6
    url = storage.join(s3_bucket, "sim")
    assert main(["simulate", "--out", url, "--n", "4", "--seed", "3"]) == 0
    assert len(read_catalog(storage.join(url, CATALOG_NAME))) >= 4


def test_config_errors_exit_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--out", "/tmp/x", "--set", "simulate.nn=5"]) == 2
    assert "simulate.nn: unknown key" in capsys.readouterr().err
    assert main(["simulate"]) == 2
    assert "simulate.out is required" in capsys.readouterr().err


def test_flags_override_config_file(tmp_path: Path) -> None:
    from lensray.cli import PREPROCESS_FLAGS, _resolve, build_parser

    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({"preprocess": {"mode": "log", "crop": 64}, "data": {"bands": ["VIS"]}}))
    args = build_parser().parse_args(
        ["preprocess", "--config", str(config_file), "--mode", "clip", "--bands", "VIS,J", "--strict"]
    )
    config = _resolve(args, PREPROCESS_FLAGS)
    assert config.preprocess.mode == "clip" and config.preprocess.crop == 64 and config.preprocess.strict
    assert config.data.bands == ("VIS", "J")


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--n",
                "160",
                "--seed",
                "5",
                "--set",
                "train.epochs=2",
                "--set",
                "train.steps_per_epoch=5",
                "--set",
                "train.sanity_samples=16",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
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
    assert printed.rstrip().splitlines()[-1] == f"HTML report: {report}"
    html = report.read_text()
    assert "Runs compared" in html and "demo-lastro (step 5)" in html and "Highest-scored non-lenses" in html
