"""The `lensray` command end to end: flags become config keys, errors are clear (the demo's end-to-end run and
its outputs: tests/test_install.py, from a non-editable install)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from terminal import terminal_sigint

from lensray import runtime, storage
from lensray._version import __version__
from lensray.cli import TRAIN_FLAGS, _resolve, build_parser, main, one_line, reportable, torch_device, use_gpu
from lensray.errors import ConfigError, StorageError
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
        "export": (["export", str(nope), "--out", out], str(nope)),
        "demo": (["demo", "--out", str(afile / "demo")], str(afile / "demo")),
    }


@pytest.mark.parametrize(
    "command", ["preprocess", "store info", "train", "evaluate", "compare", "score", "export", "demo"]
)
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


def test_ray_data_execution_lines_stay_hidden_without_verbose() -> None:
    """Importing ray.data (which Ray Data jobs do after Ray starts) resets its loggers to INFO: its
    'Starting execution' lines then filled every `lensray preprocess` and `score` output."""
    probe = (
        "import logging; from lensray import runtime; runtime._hide_ray_notices(); import ray.data; "
        "print(logging.getLogger('ray.data').getEffectiveLevel())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert int(done.stdout.split()[-1]) >= logging.WARNING, done.stderr


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
        "export",
        "grade",
        "grade-merge",
        "grades-to-catalog",
        "report-loop",
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
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=terminal_sigint
    )
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


# --- local paths are resolved on the driver (issue 13, defect 2) --------------------------------------


def test_every_path_argument_is_absolute_before_the_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lensray.cli import resolve_paths

    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    cases = {
        ("evaluate", "--run", "runs/a", "--store", "s.zarr", "--out", "ev", "--config", "c.yaml"): (
            "run",
            "store",
            "out",
            "config",
        ),
        ("compare", "runs/a", "s3://b/runs/b", "--out", "cmp", "--store", "s.zarr"): ("runs", "out", "store"),
        ("score", "--run", "runs/a", "--images", "raw", "--catalog", "raw/c.csv", "--out", "c.parquet"): (
            "run",
            "images",
            "catalog",
            "out",
        ),
        ("store", "info", "s.zarr"): ("url",),
        ("tune", "--config", "t.yaml", "--store", "s.zarr", "--storage", "exp"): ("config", "store", "storage"),
        ("demo", "--out", "demo"): ("out",),
    }
    for argv, names in cases.items():
        args = resolve_paths(parser.parse_args(list(argv)))
        for name in names:
            values = getattr(args, name)
            for value in values if isinstance(values, list) else [values]:
                assert value.startswith("s3://") or value.startswith(str(tmp_path)), (argv, name, value)
    args = resolve_paths(parser.parse_args(["train", "--store", "s.zarr", "--out", "runs", "--set", "data.images=raw"]))
    config = _resolve(args, TRAIN_FLAGS)
    assert config.data.store == str(tmp_path / "s.zarr") and config.train.out == str(tmp_path / "runs")
    assert config.data.images == str(tmp_path / "raw")


def _lensray(*argv: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own, like a user's
    return subprocess.run(
        [sys.executable, "-m", "lensray", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


@pytest.mark.slow
def test_relative_out_and_store_land_under_the_working_folder(tiny_store: str, tmp_path: Path) -> None:
    """A relative --out once sent history.json and TensorBoard into Ray's temporary folder (exit 0), and a
    relative --store failed inside the worker: both mean the folder the command was started in."""
    work = tmp_path / "work"
    work.mkdir()
    store = os.path.relpath(tiny_store, work)
    config = os.path.relpath(REPO / "configs" / "lastro.yaml", work)
    run_args = f"--config {config} --store {store} --out runs --name rel --workers 1 --device cpu".split()
    sets = ("train.sanity=false", "model.lastro.filters=4", "model.lastro.pairs=1", "model.lastro.dense=[8]")
    knobs = ["--steps-per-epoch", "2", "--batch-size", "8", *(part for key in sets for part in ("--set", key))]

    trained = _lensray("train", *run_args, *knobs, "--epochs", "1", cwd=work)
    assert trained.returncode == 0, trained.stderr
    run = work / "runs" / "rel"
    assert len(json.loads((run / "history.json").read_text())) == 1, trained.stdout
    assert (run / "tensorboard").is_dir() and list(run.glob("checkpoint_*"))

    evaluate = f"evaluate --run runs/rel --store {store} --split val --out eval --device cpu".split()
    evaluated = _lensray(*evaluate, cwd=work)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((work / "eval" / "metrics.json").read_text())["split"] == "val"

    resumed = _lensray("train", *run_args, *knobs, "--epochs", "2", "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert [row["epoch"] for row in json.loads((run / "history.json").read_text())] == [1, 2]


# --- configs and tune files from any URL storage reads (issue 13, defect 6) ----------------------------


def _s3_tune_file(bucket: str, store: str) -> str:
    """A run config at s3://bucket/configs/ and a tune file at s3://bucket/tune/ naming it as ``../configs/``."""
    storage.write_bytes(storage.join(bucket, "configs", "lastro.yaml"), (REPO / "configs" / "lastro.yaml").read_bytes())
    tune = {
        "base": "../configs/lastro.yaml",
        "run": {"data": {"store": store}, "train": {"epochs": 2}},
        "space": {"optim.lr": {"grid": [1.0e-3, 3.0e-3]}},
        "search": {"name": "from-s3"},
    }
    url = storage.join(bucket, "tune", "search.yaml")
    storage.write_bytes(url, yaml.safe_dump(tune).encode())
    return url


def test_a_tune_file_on_s3_resolves_its_base_against_its_own_url(s3_bucket: str, tmp_path: Path) -> None:
    from lensray.train.tune import load_tune_config

    url = _s3_tune_file(s3_bucket, "store.zarr")
    spec = load_tune_config(url, ["search.num_samples=3"])
    lastro = yaml.safe_load((REPO / "configs" / "lastro.yaml").read_text())
    assert spec.run.optim.lr == lastro["optim"]["lr"] and spec.run.train.balanced is lastro["train"]["balanced"]
    assert spec.run.train.epochs == 2 and spec.search.num_samples == 3 and list(spec.space) == ["optim.lr"]
    assert spec.run.data.store == os.path.abspath("store.zarr")  # the working folder's, as on the command line
    storage.write_bytes(url, yaml.safe_dump({"base": "nope.yaml", "space": {"optim.lr": {"grid": [1.0]}}}).encode())
    with pytest.raises(ConfigError, match=rf"base: no run config at {s3_bucket}/tune/nope.yaml"):
        load_tune_config(url, [])


def test_train_and_tune_read_their_config_from_s3(
    s3_bucket: str, tiny_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"data": {"store": tiny_store}, "model": {"lastro": {"filters": 8, "dense": [16]}}}
    config["train"] = {"sanity_samples": 16, "sanity_steps": 40}
    config["optim"] = {"lr": 3.0e-3}
    url = storage.join(s3_bucket, "run.yaml")
    storage.write_bytes(url, yaml.safe_dump(config).encode())
    assert main(["train", "--config", url, "--sanity", "--device", "cpu"]) == 0
    assert "sanity check passed" in capsys.readouterr().out

    tune_url = _s3_tune_file(s3_bucket, tiny_store)
    missing = tmp_path / "no-store.zarr"  # the search reads its config, then fails fast on the store
    argv = ["tune", "--config", tune_url, "--store", str(missing), "--storage", str(tmp_path / "exp")]
    assert main(argv) == 1
    assert_one_error_line(capsys, "tune", str(missing))


# --- one line, exit 1, naming the object (issue 13, defect 7) -------------------------------------------


def fake_checkpoint(folder: Path, state: bytes | None = None, size: int = 32) -> Path:
    """A checkpoint folder as train writes it (config.yaml, model_input.json, state.pt), with the weights of
    a fresh LASTRO net for 2 x ``size`` x ``size`` inputs, or ``state`` as its state.pt."""
    import io

    import torch

    from lensray.config import LensrayConfig, dump_config
    from lensray.models import build_model

    folder.mkdir(parents=True)
    config = LensrayConfig()
    (folder / "config.yaml").write_text(dump_config(config))
    (folder / "model_input.json").write_text(json.dumps({"channels": 2, "size": size, "bands": ["VIS", "H"]}))
    if state is None:
        buffer = io.BytesIO()
        model = build_model(config.model, 2, size)
        torch.save({"model": model.state_dict(), "history": [], "epoch": 1}, buffer)
        state = buffer.getvalue()
    (folder / "state.pt").write_bytes(state)
    return folder


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def malicious_state(marker: Path) -> bytes:
    """A state.pt whose unpickling would create ``marker`` (torch.load with weights_only=False runs it)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"model": _Payload(marker), "history": [], "epoch": 1}, buffer)
    return buffer.getvalue()


def bad_checkpoints(tmp_path: Path, marker: Path) -> dict[str, Path]:
    valid = fake_checkpoint(tmp_path / "valid").joinpath("state.pt").read_bytes()
    return {
        "corrupt": fake_checkpoint(tmp_path / "corrupt", b"not a torch file"),
        "truncated": fake_checkpoint(tmp_path / "truncated", valid[: len(valid) // 2]),
        "malicious": fake_checkpoint(tmp_path / "malicious", malicious_state(marker)),
    }


@pytest.mark.parametrize("command", ["evaluate", "compare", "score"])
def test_a_bad_checkpoint_is_one_line_naming_it_and_never_advises_weights_only_false(
    command: str, tiny_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    out = str(tmp_path / "out")
    for kind, checkpoint in bad_checkpoints(tmp_path, marker).items():
        argv = {
            "evaluate": ["evaluate", "--run", str(checkpoint), "--store", tiny_store, "--out", out],
            "compare": ["compare", str(checkpoint), "--out", out],
            "score": ["score", "--run", str(checkpoint), "--images", out, "--catalog", f"{out}/c.csv", "--out", out],
        }[command]
        assert main([*argv, "--device", "cpu"]) == 1, kind
        err = capsys.readouterr().err
        assert "weights_only" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"lensray {command}: "), err
        assert str(checkpoint / "state.pt") in lines[0], lines[0]
        assert not marker.exists(), f"{kind}: a checkpoint ran code"


def test_missing_config_and_catalogue_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(missing)]) == 1
    assert_one_error_line(capsys, "train", str(missing))
    (tmp_path / "raw").mkdir()
    catalogue = tmp_path / "raw" / "catalogue.csv"
    argv = ["preprocess", "--images", str(tmp_path / "raw"), "--catalog", str(catalogue)]
    assert main([*argv, "--out", str(tmp_path / "s.zarr")]) == 1
    assert_one_error_line(capsys, "preprocess", str(catalogue))


def _store(url: str, *, size: int = 32, finalize: bool = True) -> str:
    import numpy as np

    from lensray.ingest.store import create_store, finalize_store, write_shard

    labels = np.tile([0, 1], 8).astype(np.int8)
    split = np.repeat(np.int8([0, 1]), 8)
    meta = {"preprocess": {"synthetic": True}, "label_rule": "paper", "bands": ["VIS", "H"], "source": {}}
    create_store(
        url,
        ids=np.arange(1, 17),
        labels=labels,
        split=split,
        channels=2,
        size=size,
        dtype="float32",
        shard_size=8,
        meta=meta,
    )
    if finalize:
        for shard in range(2):
            write_shard(url, shard, np.zeros((8, 2, size, size), np.float32), np.ones(8, bool), [])
        finalize_store(url)
    return url


def test_unfinished_and_mismatched_stores_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unfinished = _store(str(tmp_path / "unfinished.zarr"), finalize=False)
    checkpoint = str(fake_checkpoint(tmp_path / "checkpoint"))
    out = str(tmp_path / "out")
    for argv in (
        ["train", "--store", unfinished, "--out", out, "--device", "cpu"],
        ["train", "--store", unfinished, "--sanity", "--device", "cpu"],
        ["evaluate", "--run", checkpoint, "--store", unfinished, "--split", "val", "--out", out, "--device", "cpu"],
    ):
        assert main(argv) == 1, argv
        assert "not finalized" in assert_one_error_line(capsys, argv[0], unfinished)
    other = _store(str(tmp_path / "other-geometry.zarr"), size=16)
    assert main(["evaluate", "--run", checkpoint, "--store", other, "--out", out, "--device", "cpu"]) == 1
    assert_one_error_line(capsys, "evaluate", other)


def test_an_existing_store_of_another_config_is_one_line(
    tmp_path: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = str(tmp_path / "raw")
    assert main(["simulate", "--out", raw, "--n", "4", "--workers", "1"]) == 0
    capsys.readouterr()
    store = _store(str(tmp_path / "store.zarr"))  # written by another preprocessing
    argv = ["preprocess", "--images", raw, "--catalog", f"{raw}/{CATALOG_NAME}", "--out", store]
    assert main(argv) == 1
    assert "different parameters" in assert_one_error_line(capsys, "preprocess", store)


def test_an_unreachable_endpoint_or_a_missing_bucket_is_one_line(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["store", "info", "s3://no-such-bucket-here/store.zarr"]) == 1
    assert "does not exist" in assert_one_error_line(capsys, "store info", "s3://no-such-bucket-here/store.zarr")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setattr(storage, "RETRY_DELAYS_S", (), raising=False)  # storage's tests time the retries
    store, out = storage.join(s3_bucket, "store.zarr"), storage.join(s3_bucket, "out")
    for argv in (
        ["store", "info", store],
        ["train", "--store", store, "--out", out, "--device", "cpu"],
        ["evaluate", "--run", storage.join(s3_bucket, "runs", "a"), "--store", store, "--out", out, "--device", "cpu"],
        ["compare", storage.join(s3_bucket, "runs", "a"), "--out", str(tmp_path / "cmp"), "--device", "cpu"],
        ["simulate", "--out", storage.join(s3_bucket, "raw"), "--n", "4"],
    ):
        command = "store info" if argv[0] == "store" else argv[0]
        assert main(argv) == 1, argv
        assert "cannot reach" in assert_one_error_line(capsys, command, s3_bucket)
