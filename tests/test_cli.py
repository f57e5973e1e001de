"""The `lensray` command end to end: flags become config keys, errors are clear, the demo runs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lensray import runtime, storage
from lensray._version import __version__
from lensray.cli import TRAIN_FLAGS, _resolve, build_parser, main, one_line, reportable, torch_device, use_gpu
from lensray.errors import StorageError
from lensray.sky.catalog import CATALOG_NAME, read_catalog

REPO = Path(__file__).resolve().parents[1]


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


def assert_one_error_line(capsys: pytest.CaptureFixture[str], command: str, path: str) -> str:
    """Exactly one line on stderr, ``lensray <command>: <message>``, and the message names ``path``."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lensray {command}: ") and path in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def wrong_path_cases(nope: Path, afile: Path) -> dict[str, tuple[list[str], str]]:
    """Per subcommand: a command line with one wrong path, and that path."""
    out = str(nope.parent / "out")
    return {
        "preprocess": (["preprocess", "--images", str(nope), "--catalog", f"{nope}/cat.csv", "--out", out], str(nope)),
        "store info": (["store", "info", str(nope)], str(nope)),
        "train": (["train", "--store", str(nope), "--out", out], str(nope)),
        "evaluate": (["evaluate", "--run", str(nope), "--store", str(nope), "--out", out], str(nope)),
        "compare": (["compare", str(nope), "--out", out], str(nope)),
        "score": (["score", "--run", str(nope), "--images", out, "--catalog", f"{out}/c.csv", "--out", out], str(nope)),
        "demo": (["demo", "--out", str(afile / "demo")], str(afile / "demo")),
    }


@pytest.mark.parametrize("command", ["preprocess", "store info", "train", "evaluate", "compare", "score", "demo"])
def test_a_wrong_path_is_one_line_naming_it_and_exit_1(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    argv, path = wrong_path_cases(tmp_path / "nope", afile)[command]
    assert main(argv) == 1
    assert_one_error_line(capsys, command, path)


def test_simulate_out_under_a_file_is_one_line_and_exit_1(
    tmp_path: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    assert main(["simulate", "--out", str(afile / "raw"), "--n", "4", "--workers", "1"]) == 1
    assert_one_error_line(capsys, "simulate", str(afile / "raw"))


def test_a_missing_tune_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["tune", "--config", str(missing)]) == 2
    assert_one_error_line(capsys, "tune", str(missing))


def test_verbose_shows_the_traceback_and_quiet_or_verbose_go_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nope = str(tmp_path / "nope")
    try:
        assert main(["-q", "store", "info", nope]) == 1
        assert logging.getLogger("lensray").level == logging.WARNING and runtime.quiet() and not runtime.verbose()
        assert_one_error_line(capsys, "store info", nope)
        assert main(["store", "info", nope, "-v"]) == 1
        assert logging.getLogger("lensray").level == logging.DEBUG and runtime.verbose()
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("lensray store info: ")
        assert main(["store", "info", "--quiet", nope]) == 1 and runtime.quiet()
        assert main(["store", "info", nope]) == 1
        assert logging.getLogger("lensray").level == logging.INFO and not runtime.quiet() and not runtime.verbose()
    finally:
        logging.getLogger("lensray").setLevel(logging.NOTSET)


def test_errors_from_ray_tasks_are_unwrapped_to_the_lensray_error(ray_cluster: None) -> None:
    import ray

    @ray.remote
    def read(url: str) -> None:
        raise StorageError(f"{url} does not exist")

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(read.remote("s3://bucket/missing"))
    cause = reportable(caught.value)
    assert type(cause) is StorageError and one_line(cause) == "s3://bucket/missing does not exist"
    assert reportable(ValueError("a bug")) is None  # anything else keeps its traceback


def test_device_flag_sets_resources_use_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    parser = build_parser()
    for device, expected in (("cpu", False), ("cuda", True)):
        args = parser.parse_args(["train", "--store", "s.zarr", "--device", device])
        assert _resolve(args, TRAIN_FLAGS).resources.use_gpu is expected
    assert _resolve(parser.parse_args(["train"]), TRAIN_FLAGS).resources.use_gpu is False  # the config's default
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # no cluster to ask: this machine decides
    assert use_gpu("auto") == ("true" if torch.cuda.is_available() else "false")
    assert torch_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu") and torch_device("cpu") == "cpu"
    for command in (
        ["evaluate", "--run", "r", "--out", "o"],
        ["compare", "r", "--out", "o"],
        ["score", "--run", "r", "--out", "o"],
    ):
        assert parser.parse_args([*command, "--device", "cuda"]).device == "cuda"
        assert parser.parse_args(command).device == "auto"
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["train", "--gpu"])  # replaced by --device, no alias
    assert exited.value.code == 2


def test_every_subcommand_has_a_description_and_examples() -> None:
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subcommands) == {
        "simulate",
        "preprocess",
        "store",
        "train",
        "tune",
        "evaluate",
        "compare",
        "score",
        "demo",
    }
    for name, sub in subcommands.items():
        text = sub.format_help()
        assert sub.description and "examples:" in text and f"lensray {name}" in text.split("examples:")[1], name


def test_python_m_lensray_and_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lensray", "--version"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert done.stdout.strip() == f"lensray {__version__}"
    done = subprocess.run([sys.executable, "-m", "lensray", "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "usage: lensray" in done.stdout and "130 interrupted" in done.stdout


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # reading the config blocks until a writer comes: the command is waiting when Ctrl-C arrives
    command = [sys.executable, "-m", "lensray", "simulate", "--config", str(fifo), "--out", str(tmp_path / "raw")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline, writer = time.monotonic() + 60, None
    while writer is None and time.monotonic() < deadline:
        try:  # succeeds once lensray has the FIFO open for reading; it then blocks in read()
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.1)
    assert writer is not None, "lensray never opened its config"
    try:
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        os.close(writer)
    assert process.returncode == 130
    assert err.strip().splitlines() == ["lensray simulate: interrupted"]
