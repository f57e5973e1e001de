"""Ray Train on CPU workers: DDP replicas, gathered validation, checkpoints, resume, S3 storage."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lensray import storage
from lensray.config import LensrayConfig, load_config
from lensray.ingest.store import LensStore
from lensray.train.trainer import (
    PREDICTIONS_FILE,
    CheckpointError,
    EpochRecord,
    TrainError,
    best_checkpoint,
    epoch_line,
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
    assert lines[0].startswith(f"resumed after epoch {epochs} from ") and len(lines) >= 2, lines
    assert lines[1].startswith(f"epoch {epochs + 1}/{epochs + 1}  train loss "), lines
    assert not any(line.startswith("sanity check") for line in lines), "a resumed run skips the sanity check"


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
    """history.json plus one folder per epoch in ``checkpoints``: "new" (state.pt + epoch.json), or a folder
    still being uploaded: "no-epoch" (state.pt, epoch.json not there yet) or "partial" (epoch.json, no state.pt)."""
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
    return urls


@pytest.mark.parametrize("where", ["local", "s3"])
def test_best_checkpoint_tie_rule_nan_and_deleted_checkpoints(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    run_url = storage.join(root, "runs", "hand")
    aucs = {1: 0.7, 2: 0.9, 3: math.nan, 4: 0.9, 5: None, 6: 0.8, 7: 0.99}
    history = [{"epoch": e, "val_auc": a, "val_loss": 1.0 - (a or 0.0)} for e, a in aucs.items()]
    urls = _hand_made_run(
        run_url, history, {1: "no-epoch", 2: "new", 3: "new", 4: "new", 5: "new", 6: "new", 7: "partial"}
    )

    best = best_checkpoint(run_url)
    # 7 (0.99) has no state.pt yet; 2 and 4 tie at 0.9: the earliest wins; NaN and None never win.
    assert (best.url, best.metrics, best.best_epoch) == (urls[2], history[1], 7)
    assert best_checkpoint(run_url + "/").url == urls[2]
    lowest = best_checkpoint(run_url, mode="min")
    assert lowest.url == urls[6] and lowest.metrics["epoch"] == 6, "1 (0.7) is incomplete: no epoch.json yet"
    assert best_checkpoint(run_url, "val_loss", "min").url == urls[2]  # 0.1 at 2 and 4 (and NaN at 3)

    fs, _ = storage.arrow_filesystem(run_url)
    fs.delete_dir(storage.strip_scheme(urls[2]))  # the keep-N policy dropped the best epoch's checkpoint
    best = best_checkpoint(run_url)
    assert (best.url, best.metrics["epoch"], best.best_epoch) == (urls[4], 4, 7)
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
