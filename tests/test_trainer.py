"""Ray Train on CPU workers: DDP replicas, gathered validation, checkpoints, resume, S3 storage."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from terminal import terminal_sigint

from lensray import storage
from lensray.config import LensrayConfig, load_config
from lensray.ingest.store import LensStore
from lensray.runs import CONFIG_FILE, MODEL_INPUT_FILE, complete_checkpoints
from lensray.train.trainer import (
    PREDICTIONS_FILE,
    CheckpointError,
    EpochRecord,
    TrainError,
    _forget_ray_snapshot,
    best_checkpoint,
    epoch_line,
    keep_epochs,
    prune_checkpoints,
    run_sanity_check,
    train,
)


def _config(store: str, out: str, name: str, *overrides: str) -> LensrayConfig:
    return load_config(
        Path(__file__).resolve().parents[1] / "configs" / "lastro.yaml",
        [
            f"data.store={store}",
            f"train.out={out}",
            f"train.name={name}",
            "train.epochs=3",
            "train.steps_per_epoch=4",
            "train.batch_size=16",
            "train.sanity=false",
            "model.lastro.dense=[32]",
            "model.lastro.filters=8",
            *overrides,
        ],
    )


def test_two_worker_ddp_keeps_replicas_identical_and_gathers_validation(
    tiny_store: str, tmp_path: Path, ray_cluster: None
) -> None:
    config = _config(
        tiny_store, str(tmp_path / "runs"), "ddp", "resources.num_workers=2", "resources.cpus_per_worker=0.5"
    )
    outcome = train(config)
    assert [row["epoch"] for row in outcome.history] == [1, 2, 3]
    for row in outcome.history:
        assert row["world_size"] == 2
        assert row["replica_spread"] == 0.0, "DDP replicas diverged"
        assert row["val_n"] == 32, "validation predictions of both workers must be gathered, each once"
        # The budget a comparison reports: every image both workers drew (steps x global batch).
        assert row["train_samples"] == config.train.steps_per_epoch * config.train.batch_size
        assert list(row) == [f.name for f in fields(EpochRecord)], "history.json rows are EpochRecord.as_dict()"
    predictions = np.load(Path(outcome.best_checkpoint) / PREDICTIONS_FILE)
    store = LensStore.open(tiny_store)
    assert sorted(predictions["ids"]) == sorted(store.ids[store.indices("val")])
    assert (tmp_path / "runs" / "ddp" / "config.yaml").exists()
    assert any((tmp_path / "runs" / "ddp" / "tensorboard").iterdir())


def test_resume_continues_epochs_and_lr_schedule_exactly(tiny_store: str, tmp_path: Path, ray_cluster: None) -> None:
    runs = str(tmp_path / "runs")
    # Patience 0 and a plateau at AUC 1.0 make the LR drop mid-run, so the schedule is visible.
    knobs = (
        "optim.plateau_patience=0",
        "optim.plateau_factor=0.5",
        "train.early_stopping_patience=null",
        "train.steps_per_epoch=8",
    )  # val AUC reaches 1.0 within a few epochs, then plateaus
    straight = train(_config(tiny_store, runs, "straight", "train.epochs=6", *knobs))

    train(_config(tiny_store, runs, "split", "train.epochs=3", *knobs))
    with pytest.raises(TrainError, match="already exists"):
        train(_config(tiny_store, runs, "split", "train.epochs=6", *knobs))
    resumed = train(_config(tiny_store, runs, "split", "train.epochs=6", *knobs), resume=True)

    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight.history, resumed.history, strict=False):
        assert a["lr"] == b["lr"], (a, b)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=1e-9)
    assert len({row["lr"] for row in resumed.history}) > 1, "the test needs an LR drop to mean anything"
    assert [row["resumed_from"] for row in resumed.history] == [0, 0, 0, 3, 3, 3]


def test_the_driver_shows_each_epoch_and_the_workers_notes_once(
    tiny_store: str, tmp_path: Path, ray_cluster: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker output reaches the driver only under -v: the epochs and the notes of rank 0 (sanity check,
    early stopping, resume) come to the driver's ``lensray`` logger instead, each once."""
    runs = str(tmp_path / "runs")
    knobs = ("train.sanity=true", "train.sanity_steps=40", "train.sanity_samples=16", "train.steps_per_epoch=8")
    config = _config(tiny_store, runs, "console", "train.epochs=8", "train.early_stopping_patience=1", *knobs)
    with caplog.at_level(logging.INFO, logger="lensray"):
        outcome = train(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "lensray.train.trainer"]
    epochs = len(outcome.history)
    assert epochs < 8, "the test needs an early stop (val AUC 1.0 plateaus) to mean anything"
    assert sum(line.startswith("sanity check passed") for line in lines) == 1, lines
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch ")] == [
        f"epoch {k}/8" for k in range(1, epochs + 1)
    ]
    assert lines[-1] == f"early stopping after epoch {epochs}: no val AUC gain for 1 epochs", lines

    caplog.clear()
    more = _config(tiny_store, runs, "console", f"train.epochs={epochs + 1}", "train.early_stopping_patience=1", *knobs)
    with caplog.at_level(logging.INFO, logger="lensray"):
        train(more, resume=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lensray.train.trainer"]
    assert lines[0].startswith(f"resuming run console after epoch {epochs} from ") and len(lines) >= 2, lines
    assert lines[1].startswith(f"epoch {epochs + 1}/{epochs + 1}  train loss "), lines
    assert not any(line.startswith("sanity check") for line in lines), "a resumed run skips the sanity check"


def test_resume_follows_lensrays_record_not_rays_snapshot(
    tiny_store: str, tmp_path: Path, ray_cluster: None, caplog: pytest.LogCaptureFixture
) -> None:
    """What a Ctrl-C or a killed driver leaves: Ray's snapshot missing (its controller had not written
    it yet), history.json one epoch ahead of the last complete checkpoint, a checkpoint folder cut
    short. --resume continues after the last complete epoch, says so, and keeps num_to_keep folders."""
    runs = tmp_path / "runs"
    knobs = ("train.early_stopping_patience=null", "train.num_to_keep=2")
    train(_config(tiny_store, str(runs), "cut", "train.epochs=3", *knobs))
    folder = runs / "cut"
    (folder / "checkpoint_manager_snapshot.json").unlink()
    history = json.loads((folder / "history.json").read_text())
    (folder / "history.json").write_text(json.dumps([*history, {**history[-1], "epoch": 4}]))
    partial = folder / "checkpoint_2099-01-01_00-00-00.000000"  # epoch 4's upload, cut short
    partial.mkdir()
    (partial / "epoch.json").write_text(json.dumps({"epoch": 4}))

    caplog.clear()  # the first run's lines, where an earlier test left the lensray logger at INFO
    with caplog.at_level(logging.INFO, logger="lensray"):
        resumed = train(_config(tiny_store, str(runs), "cut", "train.epochs=5", *knobs), resume=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "lensray.train.trainer"]
    assert lines[0].startswith(f"resuming run cut after epoch 3 from {folder}/checkpoint_"), lines
    assert "history.json records epochs up to 4, but the latest complete checkpoint is of epoch 3" in lines[1]
    assert [(row["epoch"], row["resumed_from"]) for row in resumed.history] == [(1, 0), (2, 0), (3, 0), (4, 3), (5, 3)]
    assert resumed.history[:3] == history, "the epochs before the resume are the first run's"
    assert len(_checkpoint_folders(folder)) == 2, _checkpoint_folders(folder)


def _checkpoint_folders(run: Path) -> list[str]:
    return sorted(path.name for path in run.glob("checkpoint_*") if path.is_dir())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_keep_rule_the_latest_and_the_best(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    assert keep_epochs([], [], 2) == set()
    aucs = {1: 0.7, 2: 0.9, 3: math.nan, 4: 0.9, 5: None, 6: 0.8}
    history = [{"epoch": e, "val_auc": a} for e, a in aucs.items()]
    assert keep_epochs(history, aucs, 1) == {6}
    assert keep_epochs(history, aucs, 2) == {6, 2}, "ties: the earliest"
    assert keep_epochs(history, aucs, 3) == {6, 2, 4}
    assert keep_epochs(history, [3, 5], 2) == {3, 5} and keep_epochs(history, [1, 3, 5], 2) == {5, 1}

    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    run_url = storage.join(root, "runs", "hand")
    urls = _hand_made_run(run_url, history, {1: "new", 2: "new", 3: "new", 4: "partial", 5: "new", 6: "new"})
    again = storage.join(run_url, "checkpoint_2025-01-01_00-01-00.000000")  # epoch 2 written again after a restart
    storage.write_bytes(storage.join(again, "state.pt"), storage.read_bytes(storage.join(urls[2], "state.pt")))
    storage.write_bytes(storage.join(again, "epoch.json"), json.dumps({"epoch": 2}).encode())
    _write_contract_files(again)
    snapshot = storage.join(run_url, "checkpoint_manager_snapshot.json")  # Ray's, a file: not a checkpoint
    storage.write_bytes(snapshot, b"{}")
    deleted = prune_checkpoints(run_url, history, 2)
    assert sorted(deleted) == sorted([urls[1], urls[2], urls[3], urls[4], urls[5]])
    remaining = [name for name in storage.list_folders(run_url) if name.startswith("checkpoint_")]
    assert remaining == sorted(url.rsplit("/", 1)[-1] for url in (again, urls[6]))
    assert prune_checkpoints(run_url, history, 2) == [] and storage.exists(snapshot)
    _forget_ray_snapshot(run_url)  # what every start of a TorchTrainer on the folder does first
    assert not storage.exists(snapshot)
    _forget_ray_snapshot(run_url)


def test_epoch_line() -> None:
    record = EpochRecord(
        epoch=2,
        train_loss=0.43121,
        val_loss=0.5,
        val_acc=0.8,
        val_auc=0.9123,
        val_tpr0=0.1,
        val_tpr10=0.414,
        val_n=100,
        lr=1e-3,
        train_samples=1000,
        samples_per_s=1750.4,
        epoch_s=0.6,
        world_size=2,
        replica_spread=0.0,
        resumed_from=0,
    )
    assert EpochRecord.from_dict({**record.as_dict(), "checkpoint_path": "x"}) == record
    assert (
        epoch_line(record, 10, 80) == "epoch 2/10  train loss 0.4312  val AUC 0.912  TPR10 0.41  1750 img/s  ETA 1m20s"
    )
    assert epoch_line(record, 10, 7300).endswith("ETA 2h01m") and epoch_line(record, 2, 0).endswith("ETA 0 s")


def test_training_learns_separable_set(tiny_store: str, tmp_path: Path, ray_cluster: None) -> None:
    outcome = train(_config(tiny_store, str(tmp_path / "runs"), "learn", "train.epochs=6", "train.steps_per_epoch=8"))
    assert max(row["val_auc"] for row in outcome.history) > 0.95
    assert outcome.best_metrics["val_auc"] == max(row["val_auc"] for row in outcome.history)


def test_checkpoints_on_s3(tiny_store: str, s3_bucket: str, ray_cluster: None) -> None:
    runs = storage.join(s3_bucket, "runs")
    outcome = train(_config(tiny_store, runs, "s3run", "train.epochs=2"))
    assert outcome.best_checkpoint.startswith(s3_bucket)
    history = json.loads(storage.read_bytes(storage.join(runs, "s3run", "history.json")))
    assert len(history) == 2
    storage.read_bytes(storage.join(outcome.best_checkpoint, PREDICTIONS_FILE))


def _hand_made_run(run_url: str, history: list[dict], checkpoints: dict[int, str]) -> dict[int, str]:
    """history.json plus one folder per epoch in ``checkpoints``: "new" (every file of ``CHECKPOINT_FILES``), or
    a folder still being uploaded: "no-epoch" (no epoch.json yet), "partial" (no state.pt) or "no-input" (all
    but model_input.json: an upload cut off by an outage)."""
    import torch

    storage.write_bytes(storage.join(run_url, "history.json"), json.dumps(history).encode())  # NaN as Python writes it
    urls = {}
    for epoch, kind in checkpoints.items():
        url = urls[epoch] = storage.join(run_url, f"checkpoint_2025-01-01_00-00-{epoch:02d}.000000")
        if kind != "partial":
            buffer = io.BytesIO()
            torch.save({"epoch": epoch, "model": {}}, buffer)
            storage.write_bytes(storage.join(url, "state.pt"), buffer.getvalue())
        if kind != "no-epoch":
            storage.write_bytes(storage.join(url, "epoch.json"), json.dumps({"epoch": epoch}).encode())
        _write_contract_files(url, model_input=kind != "no-input")
    return urls


def _write_contract_files(url: str, model_input: bool = True) -> None:
    """The checkpoint files best_checkpoint never reads but a complete checkpoint has (placeholders here)."""
    storage.write_bytes(storage.join(url, CONFIG_FILE), b"{}\n")
    if model_input:
        storage.write_bytes(storage.join(url, MODEL_INPUT_FILE), b"{}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_best_checkpoint_tie_rule_nan_and_deleted_checkpoints(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    run_url = storage.join(root, "runs", "hand")
    aucs = {1: 0.7, 2: 0.9, 3: math.nan, 4: 0.9, 5: None, 6: 0.8, 7: 0.99, 8: 0.995}
    history = [{"epoch": e, "val_auc": a, "val_loss": 1.0 - (a or 0.0)} for e, a in aucs.items()]
    kinds = {1: "no-epoch", 2: "new", 3: "new", 4: "new", 5: "new", 6: "new", 7: "partial", 8: "no-input"}
    urls = _hand_made_run(run_url, history, kinds)

    best = best_checkpoint(run_url)
    # 8 (0.995) has no model_input.json, 7 (0.99) no state.pt yet; 2 and 4 tie at 0.9: the earliest wins;
    # NaN and None never win.
    assert (best.url, best.metrics, best.best_epoch) == (urls[2], history[1], 8)
    assert best_checkpoint(run_url + "/").url == urls[2]
    lowest = best_checkpoint(run_url, mode="min")
    assert lowest.url == urls[6] and lowest.metrics["epoch"] == 6, "1 (0.7) is incomplete: no epoch.json yet"
    assert best_checkpoint(run_url, "val_loss", "min").url == urls[2]  # 0.1 at 2 and 4 (and NaN at 3)

    fs, _ = storage.arrow_filesystem(run_url)
    fs.delete_dir(storage.strip_scheme(urls[2]))  # the keep-N policy dropped the best epoch's checkpoint
    best = best_checkpoint(run_url)
    assert (best.url, best.metrics["epoch"], best.best_epoch) == (urls[4], 4, 8)
    fs.delete_dir(storage.strip_scheme(urls[4]))
    assert best_checkpoint(run_url).url == urls[6]

    with pytest.raises(CheckpointError, match=re.escape(f"{run_url}/nope is not a run folder")):
        best_checkpoint(storage.join(run_url, "nope"))
    storage.write_bytes(storage.join(run_url, "history.json"), json.dumps([{"epoch": 1, "val_auc": None}]).encode())
    with pytest.raises(CheckpointError, match=re.escape(f"{run_url}/history.json: no epoch has a finite val_auc")):
        best_checkpoint(run_url)
    storage.write_bytes(storage.join(run_url, "history.json"), json.dumps([{"epoch": 7, "val_auc": 0.5}]).encode())
    with pytest.raises(CheckpointError, match=re.escape(run_url) + r": no complete checkpoint .*epochs \[3, 5, 6\]"):
        best_checkpoint(run_url)


def test_sanity_check_alone(tiny_store: str) -> None:
    config = _config(tiny_store, "/unused", "s", "train.sanity_steps=40", "train.sanity_samples=16")
    result = run_sanity_check(config)
    assert result.end < result.start


def test_missing_store_and_resume_errors(tmp_path: Path, tiny_store: str) -> None:
    with pytest.raises(Exception, match="nowhere"):
        train(_config(str(tmp_path / "nowhere.zarr"), str(tmp_path), "x"))
    with pytest.raises(TrainError, match="nothing to resume"):
        train(_config(tiny_store, str(tmp_path), "never-ran"), resume=True)


def test_load_run_reproduces_the_stored_validation_predictions(
    tiny_store: str, tmp_path: Path, ray_cluster: None
) -> None:
    from lensray.runs import load_run

    outcome = train(_config(tiny_store, str(tmp_path / "runs"), "reload", "train.epochs=2"))
    run = load_run(outcome.best_checkpoint)
    stored = run.val_predictions()
    store = LensStore.open(tiny_store)
    rows = np.searchsorted(store.ids, stored["ids"])
    np.testing.assert_allclose(run.predict(store.read(rows)), stored["scores"], rtol=1e-5, atol=1e-6)
    assert run.metrics["epoch"] == run.epoch and run.config.data.store == tiny_store


@pytest.mark.slow
def test_a_killed_worker_is_restarted_from_the_latest_checkpoint(
    tiny_store: str, tmp_path: Path, ray_cluster: None
) -> None:
    import contextlib
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    runs = tmp_path / "runs"
    config = _config(
        tiny_store, str(runs), "killed", "train.epochs=25", "train.max_failures=1", "train.early_stopping_patience=null"
    )
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(outcome=train(config)))
    thread.start()
    history = runs / "killed" / "history.json"
    # Ray's controller collects reported checkpoints when it polls the workers; a kill before that would
    # restart from scratch. It persists what it registered here, so wait for a registered checkpoint.
    snapshot = runs / "killed" / "checkpoint_manager_snapshot.json"

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
            return None

    def registered() -> bool:
        return (read(snapshot) or {}).get("latest_checkpoint_result") is not None

    deadline = time.time() + 180
    while time.time() < deadline and not (registered() and len(read(history) or []) >= 2):
        time.sleep(0.2)
    assert registered(), "no checkpoint was registered within 180 s"
    import ray

    address = ray.get_runtime_context().gcs_address  # explicit: other Ray clusters may run on this machine
    workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers, "no live training worker to kill"
    epochs_before_kill = len(json.loads(history.read_text()))
    # Every live worker: the state API can still list a worker of an earlier test's finished run as
    # ALIVE, and killing only that one (the first listed) left this run untouched.
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
    thread.join(timeout=300)
    outcome = result["outcome"]
    assert epochs_before_kill < 25, "the kill must land mid-run"
    assert [row["epoch"] for row in outcome.history] == list(range(1, 26))
    restarted = [row for row in outcome.history if row["resumed_from"] > 0]
    assert restarted, f"Ray never restarted the worker group (killed pids {[w.pid for w in workers]})"
    # history.json is written just before the epoch's checkpoint registers, so the restart may go back one epoch.
    assert restarted[0]["resumed_from"] >= 1 and restarted[0]["epoch"] == restarted[0]["resumed_from"] + 1


# --- the driver killed or interrupted, then --resume --------------------------------------------

# Epochs of ~1 s (so a signal lands mid-run) with an LR drop (so the schedule's state must survive too).
FAULT_KNOBS = (
    "train.epochs=6",
    "train.steps_per_epoch=48",
    "train.num_to_keep=2",
    "train.early_stopping_patience=null",
    "optim.plateau_patience=0",
    "optim.plateau_factor=0.5",
)
# Columns that depend on the clock or on where the run was resumed, not on what it learned.
UNTIMED = {"samples_per_s", "epoch_s", "resumed_from"}


@pytest.fixture(scope="module")
def uninterrupted(tiny_store: str, tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> list[dict]:
    """The history of the fault tests' run, trained without interruption."""
    return train(_config(tiny_store, str(tmp_path_factory.mktemp("whole")), "whole", *FAULT_KNOBS)).history


def _cli_train(tiny_store: str, runs: Path, name: str) -> list[str]:
    """``lensray train`` with the fault tests' settings; the driver joins this session's cluster (RAY_ADDRESS)."""
    overrides = [
        "train.batch_size=16",
        "train.sanity=false",
        "model.lastro.dense=[32]",
        "model.lastro.filters=8",
        *FAULT_KNOBS,
    ]
    config = Path(__file__).resolve().parents[1] / "configs" / "lastro.yaml"
    sets = [arg for key in overrides for arg in ("--set", key)]
    return [
        *(sys.executable, "-m", "lensray", "train", "--config", str(config), *sets),
        *("--store", tiny_store, "--out", str(runs), "--name", name),
    ]


def _stop_after_two_checkpoints(process: subprocess.Popen, run_url: str, signum: int) -> int:
    """Send ``signum`` to the driver once the run has two complete checkpoints (lensray's record);
    the number of epochs then recorded in history.json."""
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and len(complete_checkpoints(run_url)) < 2:
        time.sleep(0.1)
    assert process.poll() is None, f"the run ended before the signal: {process.communicate()}"
    process.send_signal(signum)
    return len(json.loads(storage.read_bytes(storage.join(run_url, "history.json"))))


def _assert_same_run(resumed: list[dict], whole: list[dict], folder: Path) -> None:
    """The resumed run: the uninterrupted run's epochs, each the same but for the clock, and no more
    checkpoint folders than num_to_keep."""
    assert [row["epoch"] for row in resumed] == [row["epoch"] for row in whole] == list(range(1, 7))
    for a, b in zip(resumed, whole, strict=True):
        assert a["lr"] == b["lr"], (a, b)
        for key in set(a) - UNTIMED - {"lr"}:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (key, a, b)
    assert any(row["resumed_from"] > 0 for row in resumed), "the run must have continued from a checkpoint"
    assert len({row["lr"] for row in whole}) > 1, "the test needs an LR drop to mean anything"
    assert len(_checkpoint_folders(folder)) <= 2, _checkpoint_folders(folder)


@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_last_complete_epoch(
    tiny_store: str, tmp_path: Path, ray_cluster: None, uninterrupted: list[dict]
) -> None:
    runs = tmp_path / "runs"
    command = _cli_train(tiny_store, runs, "killed-driver")
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recorded = _stop_after_two_checkpoints(driver, str(runs / "killed-driver"), signal.SIGKILL)
    driver.communicate(timeout=60)
    assert recorded < 6, "the kill must land mid-run"

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    last = _resumed_after(resumed.stderr)
    assert last >= 2, resumed.stderr
    history = json.loads((runs / "killed-driver" / "history.json").read_text())
    assert {row["resumed_from"] for row in history[last:]} == {last}, history
    _assert_same_run(history, uninterrupted, runs / "killed-driver")


def _resumed_after(stderr: str) -> int:
    """The epoch a resumed driver said it continues after (its "resuming run ..." line)."""
    match = re.search(r"^resuming run [\w-]+ after epoch (\d+) from \S+/checkpoint_\S+$", stderr, re.MULTILINE)
    assert match, stderr
    return int(match[1])


@pytest.mark.slow
def test_ctrl_c_exits_130_with_the_command_that_resumes(
    tiny_store: str, tmp_path: Path, ray_cluster: None, uninterrupted: list[dict]
) -> None:
    runs = tmp_path / "runs"
    driver = subprocess.Popen(
        _cli_train(tiny_store, runs, "ctrl-c"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=terminal_sigint,
    )
    _stop_after_two_checkpoints(driver, str(runs / "ctrl-c"), signal.SIGINT)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr
    line = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"lensray train: interrupted after epoch (\d+); continue with: (lensray train .*)", line)
    assert match, stderr
    assert shlex.split(match[2]) == [
        *("lensray", "train", "--config", str(runs / "ctrl-c" / "config.yaml")),
        *("--out", str(runs), "--name", "ctrl-c", "--resume"),
    ]

    # The printed command, as it is.
    resumed = subprocess.run(
        [sys.executable, "-m", *shlex.split(match[2])], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert _resumed_after(resumed.stderr) == int(match[1])
    history = json.loads((runs / "ctrl-c" / "history.json").read_text())
    _assert_same_run(history, uninterrupted, runs / "ctrl-c")
