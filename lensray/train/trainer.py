"""Ray Train: data-parallel training of a registered network on a preprocessed store.

``TorchTrainer`` runs ``train_loop_per_worker`` on ``resources.num_workers`` workers (DDP: NCCL on
GPUs, gloo on CPUs). Each worker feeds from its own share of the store (``data.WorkerFeed``), trains
with ``loop.train_one_epoch``, predicts its block of the validation set, and the predictions of all
workers are gathered before ACC/AUC are computed (only rank 0's report reaches Ray). Every epoch rank 0
saves a checkpoint (weights, optimiser, LR schedule, early stopping, RNG, history, resolved config,
validation predictions), kept by best ``val_auc``; ``best_checkpoint`` finds a run's best one from
storage alone (local or s3://, no cluster), by one tie rule used everywhere. Re-running with the same
``train.name`` and ``train.out`` resumes from the latest checkpoint; ``train.max_failures`` lets Ray
restart workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensray import storage
from lensray.config import LensrayConfig, config_from_dict, dump_config
from lensray.errors import CheckpointError, TrainError
from lensray.evaluate.metrics import summarise
from lensray.ingest.store import LensStore
from lensray.models import build_model
from lensray.models.inference import unwrap, validate
from lensray.runs import (
    CONFIG_FILE,
    EPOCH_FILE,
    HISTORY_FILE,
    MODEL_INPUT_FILE,
    PREDICTIONS_FILE,
    STATE_FILE,
    BestCheckpoint,
    best_checkpoint,
)
from lensray.runtime import ensure_ray
from lensray.train.feed import EvalFeed, WorkerFeed, sanity_set
from lensray.train.loop import (
    EarlyStopping,
    LoopState,
    SanityResult,
    amp_settings,
    make_optimizer,
    make_scheduler,
    sanity_check,
    train_one_epoch,
)

EVAL_BATCH = 128


@dataclass
class TrainOutcome:
    run_url: str  # the run's folder under train.out
    best_checkpoint: str | None  # URL of the checkpoint with the best val_auc
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def __str__(self) -> str:
        lines = [f"run: {self.run_url}  ({self.wall_s:.0f} s)"]
        if self.history:
            lines.append(
                f"  {'epoch':>5s} {'loss':>7s} {'val_loss':>8s} {'val_acc':>7s} {'val_auc':>7s} {'tpr0':>5s} {'tpr10':>5s} {'lr':>8s} {'img/s':>7s}"
            )
            for row in self.history[-8:]:
                lines.append(
                    f"  {row['epoch']:5d} {row['train_loss']:7.4f} {row['val_loss']:8.4f} {row['val_acc']:7.3f} "
                    f"{row['val_auc']:7.3f} {row['val_tpr0']:5.2f} {row['val_tpr10']:5.2f} {row['lr']:8.1e} {row['samples_per_s']:7.0f}"
                )
        if self.best_checkpoint:
            lines.append(
                f"  best: epoch {self.best_metrics.get('epoch')} val_auc {self.best_metrics.get('val_auc', float('nan')):.3f} -> {self.best_checkpoint}"
            )
        return "\n".join(lines)


def run_name(config: LensrayConfig) -> str:
    return config.train.name or f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def runs_root(config: LensrayConfig) -> str:
    return config.train.out or str(Path("runs").resolve())


# --- the sanity check, alone (``lensray train --sanity``) ---------------------------------------


def run_sanity_check(config: LensrayConfig, device: torch.device | str = "cpu") -> SanityResult:
    """Overfit a small fixed batch with the configured model and optimiser; raises SanityCheckError."""
    store = LensStore.open(_store_url(config))
    channels, size = store.sample_shape[0], store.sample_shape[1]
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, channels, size).to(device)
    images, labels = sanity_set(store, config.train.sanity_samples, config.train.seed)
    return sanity_check(
        model, images, labels, lambda m: make_optimizer(m, config.optim), config.train.sanity_steps, device=device
    )


def describe_sanity(result: SanityResult) -> str:
    return (
        f"sanity check passed: on {len(result.losses)} steps over a fixed set, training loss {result.start:.3f} -> "
        f"eval-mode loss {result.end:.3f} (< {result.limit:.2f} needed) in {result.seconds:.1f} s"
    )


def _store_url(config: LensrayConfig) -> str:
    if config.data.store is None:
        raise TrainError("data.store is required: the URL of a store written by `lensray preprocess`")
    return config.data.store


# --- the per-worker function --------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; ``loop_config`` is the resolved config as plain data."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    config = config_from_dict(loop_config["config"], "train_loop_config")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    local_world_size = context.get_local_world_size()
    device = ray.train.torch.get_device()
    store = LensStore.open(_store_url(config))
    channels, size = store.sample_shape[0], store.sample_shape[1]

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, channels, size).to(device)
    checkpoint = ray.train.get_checkpoint()
    if config.train.sanity and checkpoint is None:
        images, labels = sanity_set(store, config.train.sanity_samples, config.train.seed)
        result = sanity_check(
            model, images, labels, lambda m: make_optimizer(m, config.optim), config.train.sanity_steps, device=device
        )
        if rank == 0:
            print(describe_sanity(result))

    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, config.optim)
    scheduler = make_scheduler(optimizer, config.optim)
    stopper = EarlyStopping(config.train.early_stopping_patience, mode="max")
    amp_dtype, scaler = amp_settings(config.train.amp, device)
    feed = WorkerFeed(
        store,
        config.train,
        rank=rank,
        world_size=world_size,
        local_world_size=local_world_size,
        pin_memory=device.type == "cuda",
    )
    val_feed = EvalFeed(
        store,
        split="val",
        subset=config.train.val_subset,
        seed=config.train.seed,
        rank=rank,
        world_size=world_size,
        batch_size=EVAL_BATCH,
        feed=config.train.feed,
        local_world_size=local_world_size,
    )

    start_epoch, history = 0, []
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = LoopState.load(Path(folder) / STATE_FILE, map_location=device)
        state.restore(model=model, optimizer=optimizer, scheduler=scheduler, early_stopping=stopper, scaler=scaler)
        start_epoch, history = state.epoch, state.history
        if rank == 0:
            print(f"resumed after epoch {start_epoch} from {checkpoint.path}")

    tensorboard = _TensorBoard(loop_config["run_url"]) if rank == 0 else None
    for epoch in range(start_epoch, config.train.epochs):
        feed.set_epoch(epoch)
        started = time.perf_counter()
        stats = train_one_epoch(model, feed, optimizer, device=device, amp_dtype=amp_dtype, scaler=scaler)
        labels, scores = validate(unwrap(model), val_feed, device=device, amp_dtype=amp_dtype)
        # Only rank 0's report reaches Ray: every rank's predictions are gathered first.
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(
            gathered,
            {
                "ids": val_feed.ids,
                "labels": labels,
                "scores": scores,
                "loss": stats["loss"],
                "samples": stats["samples"],
                "seconds": stats["seconds"],
                "checksum": _weights_checksum(model),
            },
        )
        all_ids = np.concatenate([g["ids"] for g in gathered])
        all_labels = np.concatenate([g["labels"] for g in gathered])
        all_scores = np.concatenate([g["scores"] for g in gathered])
        metrics = summarise(all_labels, all_scores)
        scheduler.step(metrics["auc"])
        stop = stopper.step(metrics["auc"])
        checksums = [g["checksum"] for g in gathered]
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.average([g["loss"] for g in gathered], weights=[g["samples"] for g in gathered])),
            "val_loss": _bce(all_labels, all_scores),
            "val_acc": metrics["acc"],
            "val_auc": metrics["auc"],
            "val_tpr0": metrics["tpr0"],
            "val_tpr10": metrics["tpr10"],
            "val_n": int(metrics["n"]),
            "lr": optimizer.param_groups[0]["lr"],
            "train_samples": int(sum(g["samples"] for g in gathered)),  # images seen this epoch, all ranks
            "samples_per_s": sum(g["samples"] for g in gathered) / max(max(g["seconds"] for g in gathered), 1e-9),
            "epoch_s": time.perf_counter() - started,
            "world_size": world_size,
            "replica_spread": float(max(checksums) - min(checksums)),  # 0 when DDP keeps replicas identical
            "resumed_from": start_epoch,  # > 0: this epoch ran after a restart from that epoch's checkpoint
        }
        history.append(record)
        checkpoint_out = None
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                state = LoopState.capture(
                    epoch=epoch + 1,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    early_stopping=stopper,
                    scaler=scaler,
                    history=history,
                )
                state.save(Path(folder) / STATE_FILE)
                (Path(folder) / EPOCH_FILE).write_text(json.dumps({"epoch": epoch + 1}))
                (Path(folder) / CONFIG_FILE).write_text(dump_config(config))
                np.savez(Path(folder) / PREDICTIONS_FILE, ids=all_ids, labels=all_labels, scores=all_scores)
                (Path(folder) / MODEL_INPUT_FILE).write_text(
                    json.dumps(
                        {
                            "channels": channels,
                            "size": size,
                            "bands": store.meta.get("bands"),
                            "store": store.url,
                            "transform": store.meta.get("transform"),
                        }
                    )
                )
                checkpoint_out = ray.train.Checkpoint.from_directory(folder)
                tensorboard.log(record)
                storage.write_bytes(
                    storage.join(loop_config["run_url"], HISTORY_FILE), json.dumps(history, indent=1).encode()
                )
            ray.train.report(record, checkpoint=checkpoint_out)
        if stop:
            if rank == 0:
                print(f"early stopping after epoch {epoch + 1}: no val AUC gain for {stopper.patience} epochs")
            break
    if tensorboard is not None:
        tensorboard.close()


def _bce(labels: np.ndarray, scores: np.ndarray) -> float:
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def _weights_checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(
            sum(p.double().sum().item() + p.double().square().sum().item() for p in unwrap(model).parameters())
        )


class _TensorBoard:
    """Scalars per epoch, written locally and copied to the run folder (which may be on S3)."""

    def __init__(self, run_url: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._local = tempfile.mkdtemp(prefix="lensray-tb-")
        self._url = storage.join(run_url, "tensorboard")
        self._writer = SummaryWriter(self._local)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, record["epoch"])
        self._writer.flush()
        for path in Path(self._local).iterdir():
            storage.write_bytes(storage.join(self._url, path.name), path.read_bytes())

    def close(self) -> None:
        self._writer.close()


# --- the driver -------------------------------------------------------------------------------


def build_trainer(config: LensrayConfig, name: str, run_callbacks: list[Any] | None = None) -> Any:
    """A TorchTrainer for ``config`` writing under ``train.out/name`` (local path or s3://)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root = runs_root(config)
    filesystem = storage.arrow_filesystem(root)[0] if storage.is_s3(root) else None
    resources = {"CPU": config.resources.cpus_per_worker}
    if config.resources.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "run_url": storage.join(root, name)},
        scaling_config=ScalingConfig(
            num_workers=config.resources.num_workers, use_gpu=config.resources.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if config.resources.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage.strip_scheme(root),
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.train.num_to_keep, checkpoint_score_attribute="val_auc", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            callbacks=run_callbacks,
        ),
    )


def train(config: LensrayConfig, *, resume: bool = False) -> TrainOutcome:
    """Train (or, with ``resume``, continue) the run ``train.name`` under ``train.out``."""
    import ray
    import ray.train

    if resume and config.train.name is None:
        raise TrainError("--resume needs the run's name (train.name / --name)")
    store = LensStore.open(_store_url(config))  # fail fast on a wrong URL or an unfinished store
    if len(store.indices("val")) < 2:
        raise TrainError(f"{store.url}: the validation split is too small to compute AUC")
    name = run_name(config)
    run_url = storage.join(runs_root(config), name)
    exists = _run_exists(run_url)
    if exists and not resume:
        raise TrainError(f"{run_url} already exists: pass --resume to continue it, or choose another --name")
    if resume and not exists:
        raise TrainError(f"nothing to resume at {run_url}")
    ensure_ray()
    storage.write_bytes(storage.join(run_url, CONFIG_FILE), dump_config(config).encode())
    started = time.perf_counter()
    try:
        build_trainer(config, name).fit()
    except ray.train.WorkerGroupError as exc:
        rank, failure = sorted(exc.worker_failures.items())[0]
        raise TrainError(f"worker {rank} failed: {_root_cause(failure)}\n(run folder: {run_url})") from exc
    return run_outcome(run_url, time.perf_counter() - started)


def _root_cause(exc: BaseException) -> BaseException:
    """The user-code exception inside Ray's wrappers (RayTaskError keeps it as ``cause``)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _run_exists(run_url: str) -> bool:
    """A run exists once it finished an epoch (a run that failed before that can be started again)."""
    return storage.exists(storage.join(run_url, HISTORY_FILE))


def run_outcome(run_url: str, wall_s: float) -> TrainOutcome:
    """The history and best checkpoint of a finished run, read back from its folder."""
    history: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError):
        history = json.loads(storage.read_bytes(storage.join(run_url, HISTORY_FILE)))
    try:
        best: BestCheckpoint | None = best_checkpoint(run_url)
    except CheckpointError:
        best = None  # e.g. val_auc NaN at every epoch: the outcome says so by having no best checkpoint
    return TrainOutcome(
        run_url=run_url,
        best_checkpoint=best.url if best else None,
        best_metrics=best.metrics if best else {},
        history=history,
        wall_s=wall_s,
    )


# --- the best checkpoint of a run (no cluster needed) -------------------------------------------
