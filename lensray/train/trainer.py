"""Ray Train: data-parallel training of a registered network on a preprocessed store.

``TorchTrainer`` runs ``train_loop_per_worker`` on ``resources.num_workers`` workers (DDP: NCCL on
GPUs, gloo on CPUs). Each worker feeds from its own share of the store (``data.WorkerFeed``), trains
with ``loop.train_one_epoch``, predicts its block of the validation set, and the predictions of all
workers are gathered before ACC/AUC are computed (only rank 0's report reaches Ray). Every epoch rank 0
saves a checkpoint (weights, optimiser, LR schedule, early stopping, RNG, history, resolved config,
validation predictions); ``best_checkpoint`` finds a run's best one from storage alone (local or
s3://, no cluster), by one tie rule used everywhere.

Which checkpoints exist is lensray's own record, never Ray's snapshot (``checkpoint_manager_snapshot.json``,
written only when Ray's controller gets round to it, so it can lag several epochs or be missing after a
Ctrl-C or a killed driver): a ``checkpoint_*`` folder with its ``state.pt`` and ``epoch.json``. Every start
of the worker group (``train --resume``, a worker restart under ``train.max_failures``, a Tune trial
restarted by ``tune --resume``) continues from the latest of them that loads, and rank 0 deletes, after
each checkpoint, the folders that ``keep_epochs`` does not keep (``train.num_to_keep`` in all). Ctrl-C
stops the driver with ``errors.Interrupted``, whose message is the command that resumes the run.
The driver logs one line per epoch and rank 0's notes (sanity check, resume, early stopping) on the
``lensray`` logger; Ray's own output is left to -v.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import pickle
import shlex
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from lensray import storage
from lensray.config import LensrayConfig, config_from_dict, dump_config
from lensray.errors import CheckpointError, Interrupted, TrainError, root_cause
from lensray.evaluate.metrics import summarise
from lensray.ingest.store import LensStore
from lensray.models.freeze import Frozen
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
    complete_checkpoints,  # epoch -> newest complete folder
)
from lensray.runtime import ensure_ray, quiet
from lensray.train.feed import EvalFeed, MixedFeed, WorkerFeed, sanity_set
from lensray.train.finetune import build_for, check_training, open_stores, prepare_weights
from lensray.train.loop import (
    EarlyStopping,
    LoopState,
    SanityResult,
    Scheduler,
    amp_settings,
    make_ema,
    make_optimizer,
    make_scheduler,
    sanity_check,
    train_one_epoch,
)

EVAL_BATCH = 128
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's own list of a run's checkpoints
log = logging.getLogger(__name__)


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


_build = build_for  # the configured network for a store's inputs


def run_sanity_check(config: LensrayConfig, device: torch.device | str = "cpu") -> SanityResult:
    """Overfit a small fixed batch with the configured model and optimiser (from ``train.init_from``'s
    weights, with ``train.freeze``, when set) on the first training store; raises SanityCheckError."""
    store = check_training(config)[0]
    torch.manual_seed(config.train.seed)
    model = _build(config, store)
    prepare_weights(model, config, store, fresh=True)
    model = model.to(device)
    return _sanity(model, store, config, device)


def _sanity(
    model: torch.nn.Module, store: LensStore, config: LensrayConfig, device: torch.device | str
) -> SanityResult:
    images, labels = sanity_set(store, config.train.sanity_samples, config.train.seed)
    fresh_optimizer = partial(make_optimizer, config=config.optim)
    return sanity_check(model, images, labels, fresh_optimizer, config.train.sanity_steps, device=device)


def describe_sanity(result: SanityResult) -> str:
    return (
        f"sanity check passed: on {len(result.losses)} steps over a fixed set, training loss {result.start:.3f} -> "
        f"eval-mode loss {result.end:.3f} (< {result.limit:.2f} needed) in {result.seconds:.1f} s"
    )


# --- one epoch's record -------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a run: a row of history.json, the metrics of ``ray.train.report`` (what Tune and
    the checkpoint ranking see) and TensorBoard's scalars, all from ``as_dict`` (keys in field order)."""

    epoch: int
    train_loss: float  # mean per image over every rank's batches
    val_loss: float
    val_acc: float
    val_auc: float
    val_tpr0: float
    val_tpr10: float
    val_n: int
    lr: float
    train_samples: int  # images seen this epoch, all ranks
    samples_per_s: float
    epoch_s: float
    world_size: int
    replica_spread: float  # 0 when DDP keeps replicas identical
    resumed_from: int  # > 0: this epoch ran after a restart from that epoch's checkpoint
    # With data.stores: val AUC per store URL (val_* above: the store train.select_on names); else empty.
    val_auc_stores: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0  # parameter elements trained
    frozen_params: int = 0  # parameter elements kept fixed (train.freeze)
    frozen: list[str] = field(default_factory=list)  # the frozen layers' name prefixes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> EpochRecord:
        """The record of a history row or reported metrics (keys Ray or Tune added are dropped; keys a
        record of an older lensray lacks take their defaults)."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


@dataclass(frozen=True)
class Gathered:
    """One epoch as every rank saw it: the validation predictions of all ranks (each sample once)
    and each rank's training statistics, in rank order."""

    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    losses: list[float]
    samples: list[int]
    seconds: list[float]
    checksums: list[float]  # of each rank's weights


def gather_epoch(
    world_size: int, ids: np.ndarray, labels: np.ndarray, scores: np.ndarray, stats: dict[str, float], checksum: float
) -> Gathered:
    """All-gather this rank's validation block and training stats (every rank gets all of them)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    mine = {"ids": ids, "labels": labels, "scores": scores, "checksum": checksum}
    dist.all_gather_object(gathered, {**mine, **{k: stats[k] for k in ("loss", "samples", "seconds")}})
    return Gathered(
        ids=np.concatenate([g["ids"] for g in gathered]),
        labels=np.concatenate([g["labels"] for g in gathered]),
        scores=np.concatenate([g["scores"] for g in gathered]),
        losses=[g["loss"] for g in gathered],
        samples=[g["samples"] for g in gathered],
        seconds=[g["seconds"] for g in gathered],
        checksums=[g["checksum"] for g in gathered],
    )


def epoch_record(
    epoch: int, gathered: Gathered, metrics: dict[str, Any], *, lr: float, epoch_s: float, resumed_from: int
) -> EpochRecord:
    """The record of epoch ``epoch`` (1-based) from the gathered ranks and ``summarise``'s metrics."""
    samples = sum(gathered.samples)
    return EpochRecord(
        epoch=epoch,
        train_loss=float(np.average(gathered.losses, weights=gathered.samples)),
        val_loss=_bce(gathered.labels, gathered.scores),
        val_acc=metrics["acc"],
        val_auc=metrics["auc"],
        val_tpr0=metrics["tpr0"],
        val_tpr10=metrics["tpr10"],
        val_n=int(metrics["n"]),
        lr=lr,
        train_samples=int(samples),
        samples_per_s=samples / max(max(gathered.seconds), 1e-9),
        epoch_s=epoch_s,
        world_size=len(gathered.samples),
        replica_spread=float(max(gathered.checksums) - min(gathered.checksums)),
        resumed_from=resumed_from,
    )


def _bce(labels: np.ndarray, scores: np.ndarray) -> float:
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def _weights_checksum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(
            sum(p.double().sum().item() + p.double().square().sum().item() for p in unwrap(model).parameters())
        )


# --- the per-worker function --------------------------------------------------------------------


def _tell(progress: Any, rank: int, text: str) -> None:
    """A note for the user, once (rank 0): onto the driver's console when it gave a progress queue
    (the workers' own output reaches it only under -v), else into this worker's log."""
    if rank != 0:
        return
    if progress is not None:
        progress.put(("note", text))
    else:
        print(text)


@dataclass
class _Worker:
    """What one Ray Train worker trains with (built by ``_start_worker``)."""

    config: LensrayConfig
    run_url: str
    rank: int
    world_size: int
    device: torch.device
    stores: list[LensStore]  # the training stores (data.store, or data.stores in order)
    model: torch.nn.Module  # DDP-wrapped when there are several workers
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    stopper: EarlyStopping
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    feed: WorkerFeed | MixedFeed
    val_feeds: list[EvalFeed]  # one per training store
    progress: Any  # the driver's progress queue, or None
    frozen: Frozen  # train.freeze: what stays fixed
    ema: AveragedModel | None = None  # optim.ema_decay: the weights validated and saved

    @property
    def store(self) -> LensStore:
        """The store whose validation selects the model (``train.select_on``)."""
        return self.stores[self.config.train.select_on]

    def tell(self, text: str) -> None:
        _tell(self.progress, self.rank, text)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``loop_config``: the resolved config as plain data
    (``config``), the run folder's URL (``run_url``), the driver's progress queue (``progress``,
    absent or None under Tune) and the checkpoint the driver announced it resumes from (``resume_from``)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    state, url = latest_state(loop_config["run_url"], note=partial(_tell, loop_config.get("progress"), rank))
    worker = _start_worker(loop_config, fresh=state is None)
    start_epoch, history = _resume(worker, state, url, announced=loop_config.get("resume_from"))
    tensorboard = _TensorBoard(worker.run_url) if worker.rank == 0 else None
    try:
        for epoch in range(start_epoch, worker.config.train.epochs):
            record, gathered, stop = _run_epoch(worker, epoch, resumed_from=start_epoch)
            history.append(record.as_dict())
            _report(worker, record, history, gathered, tensorboard)
            if stop:
                patience = worker.stopper.patience
                worker.tell(f"early stopping after epoch {record.epoch}: no val AUC gain for {patience} epochs")
                break
    finally:
        if tensorboard is not None:
            tensorboard.close()


def _start_worker(loop_config: dict[str, Any], *, fresh: bool) -> _Worker:
    """This worker's model (sanity-checked first on a ``fresh`` run with train.sanity), optimiser,
    LR schedule, early stopping, precision and feeds."""
    import ray.train
    import ray.train.torch

    config = config_from_dict(loop_config["config"], "train_loop_config")
    context = ray.train.get_context()
    rank, progress = context.get_world_rank(), loop_config.get("progress")
    device = ray.train.torch.get_device()
    stores = open_stores(config)
    store = stores[0]
    torch.manual_seed(config.train.seed)
    model = _build(config, store)
    # Before the optimiser (trainable parameters only) and DDP (which skips frozen ones) exist.
    frozen = prepare_weights(model, config, store, fresh=fresh)
    model = model.to(device)
    if config.train.sanity and fresh:
        _tell(progress, rank, describe_sanity(_sanity(model, store, config, device)))
    ema = make_ema(model, config.optim)  # of the bare model, before DDP wraps it
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, config.optim)
    amp_dtype, scaler = amp_settings(config.train.amp, device)
    feed, val_feeds = _feeds(stores, config, context, device)
    return _Worker(
        config=config,
        run_url=loop_config["run_url"],
        rank=rank,
        world_size=context.get_world_size(),
        device=device,
        stores=stores,
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, config.optim, config.train.epochs),
        ema=ema,
        stopper=EarlyStopping(config.train.early_stopping_patience, mode="max"),
        amp_dtype=amp_dtype,
        scaler=scaler,
        feed=feed,
        val_feeds=val_feeds,
        progress=progress,
        frozen=frozen,
    )


def _feeds(
    stores: list[LensStore], config: LensrayConfig, context: Any, device: torch.device
) -> tuple[WorkerFeed | MixedFeed, list[EvalFeed]]:
    """This rank's training feed (one store: ``WorkerFeed``; several: ``MixedFeed`` by their weights)
    and its block of each store's validation set (Ray Train ``context``)."""
    rank, world_size = context.get_world_rank(), context.get_world_size()
    local_world_size = context.get_local_world_size()
    common = {"rank": rank, "world_size": world_size, "local_world_size": local_world_size}
    if len(stores) == 1:
        feed: WorkerFeed | MixedFeed = WorkerFeed(stores[0], config.train, **common, pin_memory=device.type == "cuda")
    else:
        weights = [entry.weight for entry in config.data.training_stores()]
        feed = MixedFeed(stores, weights, config.train, **common, pin_memory=device.type == "cuda")
    val_feeds = [
        EvalFeed(
            store,
            split="val",
            subset=config.train.val_subset,
            seed=config.train.seed,
            batch_size=EVAL_BATCH,
            feed=config.train.feed,
            **common,
        )
        for store in stores
    ]
    return feed, val_feeds


# The errors of a state.pt that does not load: cut short by a kill mid-upload, deleted meanwhile, or
# holding more than weights_only allows.
UNLOADABLE = (RuntimeError, EOFError, ValueError, KeyError, TypeError, FileNotFoundError, pickle.UnpicklingError)


def latest_state(run_url: str, note: Any = print) -> tuple[LoopState | None, str | None]:
    """The loop state and URL of the run's latest complete checkpoint that loads (lensray's record:
    ``checkpoint_*`` folders with every file of ``CHECKPOINT_FILES``), passing over (with a ``note``) one that
    does not; (None, None) for a run without one. Every rank reads the same folders, and nothing
    writes there while a worker group starts, so all ranks resume from the same epoch."""
    for epoch, url in sorted(complete_checkpoints(run_url).items(), reverse=True):
        try:
            return LoopState.load(io.BytesIO(storage.read_bytes(storage.join(url, STATE_FILE)))), url
        except UNLOADABLE as exc:
            note(f"warning: passing over the checkpoint of epoch {epoch}, which does not load ({exc}): {url}")
    return None, None


def _resume(
    worker: _Worker, state: LoopState | None, url: str | None, *, announced: str | None
) -> tuple[int, list[dict[str, Any]]]:
    """(completed epochs, history) after loading ``state`` (from ``url``) into the worker; (0, [])
    without one. A note unless the driver ``announced`` that checkpoint: a restart within the run, a
    restarted Tune trial, or a checkpoint passed over."""
    if state is None:
        return 0, []
    state.restore(
        model=worker.model,
        optimizer=worker.optimizer,
        scheduler=worker.scheduler,
        early_stopping=worker.stopper,
        scaler=worker.scaler,
        ema=worker.ema,
    )
    if url != announced:
        worker.tell(f"resumed after epoch {state.epoch} from {url}")
    return state.epoch, state.history


def _run_epoch(worker: _Worker, epoch: int, *, resumed_from: int) -> tuple[EpochRecord, Gathered, bool]:
    """Train epoch ``epoch`` (0-based), validate, gather every rank's predictions and step the LR
    schedule and early stopping on the val AUC: (record, gathered, whether to stop now)."""
    worker.feed.set_epoch(epoch)
    started = time.perf_counter()
    model, device, amp_dtype = worker.model, worker.device, worker.amp_dtype
    stats = train_one_epoch(
        model, worker.feed, worker.optimizer, device=device, amp_dtype=amp_dtype, scaler=worker.scaler, ema=worker.ema
    )
    judged = worker.ema.module if worker.ema is not None else unwrap(model)
    checksum = _weights_checksum(model)
    per_store = []
    for val_feed in worker.val_feeds:
        labels, scores = validate(judged, val_feed, device=device, amp_dtype=amp_dtype)
        # Only rank 0's report reaches Ray: every rank's predictions are gathered first.
        per_store.append(gather_epoch(worker.world_size, val_feed.ids, labels, scores, stats, checksum))
    # The model is selected (schedule, early stopping, best checkpoint) on one store's val AUC.
    gathered = per_store[worker.config.train.select_on]
    metrics = summarise(gathered.labels, gathered.scores)
    worker.scheduler.step(metrics["auc"])
    stop = worker.stopper.step(metrics["auc"])
    lr = worker.optimizer.param_groups[0]["lr"]
    record = epoch_record(
        epoch + 1, gathered, metrics, lr=lr, epoch_s=time.perf_counter() - started, resumed_from=resumed_from
    )
    extra: dict[str, Any] = {
        "trainable_params": worker.frozen.trainable,
        "frozen_params": worker.frozen.frozen,
        "frozen": list(worker.frozen.prefixes),
    }
    if len(per_store) > 1:
        extra["val_auc_stores"] = {
            store.url: summarise(g.labels, g.scores)["auc"] for store, g in zip(worker.stores, per_store, strict=True)
        }
    return replace(record, **extra), gathered, stop


def _report(
    worker: _Worker,
    record: EpochRecord,
    history: list[dict[str, Any]],
    gathered: Gathered,
    tensorboard: _TensorBoard | None,
) -> None:
    """Every rank reports the epoch; rank 0 with its checkpoint, after logging it to TensorBoard and
    rewriting the run's history.json, and then (the checkpoint persisted) to the driver's console."""
    import ray.train

    checkpoint = None
    with tempfile.TemporaryDirectory() as folder:
        if worker.rank == 0:
            _write_checkpoint(Path(folder), worker, record.epoch, history, gathered)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            tensorboard.log(record)
            storage.write_bytes(storage.join(worker.run_url, HISTORY_FILE), json.dumps(history, indent=1).encode())
        ray.train.report(record.as_dict(), checkpoint=checkpoint)
    if worker.rank == 0:
        _prune(worker, history)
        if worker.progress is not None:
            worker.progress.put(("epoch", record.as_dict()))


def _prune(worker: _Worker, history: list[dict[str, Any]]) -> None:
    """Rank 0, once its checkpoint is uploaded: delete what ``prune_checkpoints`` drops; a failure
    costs disk space only, so it is a note, not the end of the run."""
    try:
        prune_checkpoints(worker.run_url, history, worker.config.train.num_to_keep)
    except (OSError, CheckpointError) as exc:
        worker.tell(f"warning: could not delete old checkpoints of {worker.run_url}: {exc}")


def keep_epochs(history: list[dict[str, Any]], epochs: Iterable[int], num_to_keep: int) -> set[int]:
    """Of the checkpointed ``epochs``, those kept: the latest (what a resume continues from) and the
    best others by ``val_auc`` in ``history`` under ``best_checkpoint``'s rule (ties: the earliest;
    NaN or missing last), ``num_to_keep`` in all, so the run's best checkpoint is kept when
    ``num_to_keep`` >= 2."""
    epochs = sorted(epochs)
    if not epochs:
        return set()
    auc = {int(row["epoch"]): row.get("val_auc") for row in history}

    def rank(epoch: int) -> tuple[int, float, int]:
        value = auc.get(epoch)
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return (0, -value, epoch) if finite else (1, 0.0, epoch)

    return {epochs[-1], *sorted(epochs[:-1], key=rank)[: num_to_keep - 1]}


def prune_checkpoints(run_url: str, history: list[dict[str, Any]], num_to_keep: int) -> list[str]:
    """Delete the ``checkpoint_*`` folders of ``run_url`` that lensray does not keep and return their
    URLs: those of epochs ``keep_epochs`` drops, an older folder of an epoch written again (after a
    restart), and incomplete folders (an upload cut short by a kill). Only rank 0 of the run writes
    checkpoints and it calls this after its upload returned, so no folder here is still being written."""
    complete = complete_checkpoints(run_url)
    kept = {complete[epoch] for epoch in keep_epochs(history, complete, num_to_keep)}
    doomed = [
        url
        for url in (storage.join(run_url, name) for name in storage.list_folders(run_url))
        if url.rsplit("/", 1)[-1].startswith("checkpoint_") and url not in kept
    ]
    for url in doomed:
        fs, path = storage.arrow_filesystem(url)
        with contextlib.suppress(FileNotFoundError):
            storage.retrying("delete", url, functools.partial(fs.delete_dir, path))
    return doomed


def _write_checkpoint(
    folder: Path, worker: _Worker, epoch: int, history: list[dict[str, Any]], gathered: Gathered
) -> None:
    """The checkpoint folder of ``runs.py``'s contract: loop state, epoch, config, validation
    predictions of all ranks and the input contract (geometry, bands, the store's transform)."""
    state = LoopState.capture(
        epoch=epoch,
        model=worker.model,
        optimizer=worker.optimizer,
        scheduler=worker.scheduler,
        early_stopping=worker.stopper,
        scaler=worker.scaler,
        history=history,
        ema=worker.ema,
    )
    state.save(folder / STATE_FILE)
    (folder / EPOCH_FILE).write_text(json.dumps({"epoch": epoch}))
    (folder / CONFIG_FILE).write_text(dump_config(worker.config))
    np.savez(folder / PREDICTIONS_FILE, ids=gathered.ids, labels=gathered.labels, scores=gathered.scores)
    store = worker.store
    model_input = {
        "channels": store.sample_shape[0],
        "size": store.sample_shape[1],
        "bands": store.meta.get("bands"),
        "store": store.url,  # with data.stores: the one that selects the model (they share bands and geometry)
        "transform": store.meta.get("transform"),
    }
    if len(worker.stores) > 1:
        model_input["stores"] = [s.url for s in worker.stores]
    (folder / MODEL_INPUT_FILE).write_text(json.dumps(model_input))


class _TensorBoard:
    """Scalars per epoch, written locally and copied to the run folder (which may be on S3)."""

    def __init__(self, run_url: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._local = tempfile.mkdtemp(prefix="lensray-tb-")
        self._url = storage.join(run_url, "tensorboard")
        self._writer = SummaryWriter(self._local)

    def log(self, record: EpochRecord) -> None:
        scalars = record.as_dict()
        for key, value in scalars.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, record.epoch)
        self._writer.flush()
        for path in Path(self._local).iterdir():
            storage.write_bytes(storage.join(self._url, path.name), path.read_bytes())

    def close(self) -> None:
        self._writer.close()


# --- the driver -------------------------------------------------------------------------------


class _Progress:
    """The driver's console during ``train``: one line per epoch, and the notes of the workers
    (sanity check, resume, early stopping) once. Ray Train's workers run in other processes, whose
    own output reaches the driver only under -v: rank 0 sends its epochs (once reported, i.e. with
    the checkpoint persisted) and notes, in order, through a queue actor, which a thread of the
    driver empties into the ``lensray`` logger."""

    def __init__(self, epochs: int) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})  # no CPU: the workers may hold them all
        self._epochs = epochs
        self._last: float | None = None
        self._recent: list[float] = []  # driver-side seconds of the last few epochs, for the ETA
        self._thread = threading.Thread(target=self._show_until_done, name="lensray-progress", daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self.queue.put(None)  # after everything the run sent: the thread shows it all, then ends
        self._thread.join(timeout=30)
        self.queue.shutdown()

    def _show_until_done(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=1.0)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more will come
                return
            if item is None:
                return
            kind, payload = item
            log.info(payload if kind == "note" else self._line(EpochRecord.from_dict(payload)))

    def _line(self, record: EpochRecord) -> str:
        now = time.perf_counter()
        self._recent = [*self._recent, record.epoch_s if self._last is None else now - self._last][-3:]
        self._last = now
        eta = max(self._epochs - record.epoch, 0) * sum(self._recent) / len(self._recent)
        return epoch_line(record, self._epochs, eta)


def epoch_line(record: EpochRecord, epochs: int, eta_s: float) -> str:
    """``epoch 2/10  train loss 0.4312  val AUC 0.912  TPR10 0.41  1750 img/s  ETA 1m20s``."""
    per_store = ""
    if record.val_auc_stores:  # data.stores: each store's val AUC, by its folder name
        aucs = ", ".join(
            f"{url.rstrip('/').rsplit('/', 1)[-1]} {auc:.3f}" for url, auc in record.val_auc_stores.items()
        )
        per_store = f" ({aucs})"
    return (
        f"epoch {record.epoch}/{epochs}  train loss {record.train_loss:.4f}  val AUC {record.val_auc:.3f}{per_store}  "
        f"TPR10 {record.val_tpr10:.2f}  {record.samples_per_s:.0f} img/s  ETA {_duration(eta_s)}"
    )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def build_trainer(
    config: LensrayConfig,
    name: str,
    run_callbacks: list[Any] | None = None,
    progress: _Progress | None = None,
    resume_from: str | None = None,
) -> Any:
    """A TorchTrainer for ``config`` writing under ``train.out/name`` (local path or s3://); with
    ``progress``, its epochs and notes go to the driver's console. The workers continue from the
    run's latest complete checkpoint, if any (``resume_from``: the one the driver announced)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    root = runs_root(config)
    # Remote run folders through a filesystem that retries every request on storage's rule (Ray's own
    # retry covers only its checkpoint upload, briefly).
    filesystem = None if storage.is_local(root) else storage.retrying_filesystem(root)
    resources = {"CPU": config.resources.cpus_per_worker}
    if config.resources.use_gpu:
        resources["GPU"] = 1
    run_url = storage.join(root, name)
    _forget_ray_snapshot(run_url)
    loop_config = {"config": config.model_dump(mode="json"), "run_url": run_url, "resume_from": resume_from}
    if progress is not None:
        loop_config["progress"] = progress.queue
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.resources.num_workers, use_gpu=config.resources.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if config.resources.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage.strip_scheme(root),
            storage_filesystem=filesystem,
            # Ray deletes nothing: rank 0 prunes by lensray's rule (prune_checkpoints).
            checkpoint_config=CheckpointConfig(
                num_to_keep=None, checkpoint_score_attribute="val_auc", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            callbacks=run_callbacks,
        ),
    )


def _forget_ray_snapshot(run_url: str) -> None:
    """Delete Ray's list of the run's checkpoints before a new TorchTrainer starts on the folder: it
    lags lensray's record (so Ray would hand the workers a stale checkpoint) and names folders that
    ``prune_checkpoints`` deleted (so Ray would refuse to start)."""
    url = storage.join(run_url, RAY_SNAPSHOT_FILE)
    if storage.exists(url):
        fs, path = storage.arrow_filesystem(url)
        storage.retrying("delete", url, functools.partial(fs.delete_file, path))


def train(config: LensrayConfig, *, resume: bool = False) -> TrainOutcome:
    """Train (or, with ``resume``, continue) the run ``train.name`` under ``train.out``; a line per
    epoch on the ``lensray`` logger (INFO). Ctrl-C raises ``Interrupted`` with the resume command."""
    import ray.train

    name, run_url, stores = _check_run(config, resume)
    config = with_store_layout(config, stores[0])
    try:
        ensure_ray()
        resume_from = announce_resume(name, run_url, config.train.num_to_keep) if resume else None
        storage.write_bytes(storage.join(run_url, CONFIG_FILE), dump_config(config).encode())
        started = time.perf_counter()
        progress = None if quiet() else _Progress(config.train.epochs)
        with progress if progress is not None else contextlib.nullcontext():
            _fit(build_trainer(config, name, progress=progress, resume_from=resume_from))
    except ray.train.WorkerGroupError as exc:
        rank, failure = sorted(exc.worker_failures.items())[0]
        raise TrainError(f"worker {rank} failed: {root_cause(failure)}\n(run folder: {run_url})") from exc
    except KeyboardInterrupt:
        raise _interrupted(runs_root(config), name) from None
    return run_outcome(run_url, time.perf_counter() - started)


def _trainer_class() -> type:
    """TorchTrainer, except that Ctrl-C stays a KeyboardInterrupt of the driver: in the main thread,
    Ray Train's ``fit`` replaces the SIGINT handler with one that aborts the run and then exits the
    process itself (status 1, no message, no way to say how to resume). ``_fit`` aborts instead."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        controller: Any = None  # Ray Train's controller actor, once fit() started it

        def _register_sigint_handler(self, controller: Any) -> None:  # Ray 2.60's hook, main thread only
            self.controller = controller

    return Trainer


def _fit(trainer: Any) -> None:
    """``trainer.fit()``; on Ctrl-C, the run is aborted (Ray's own abort: workers stopped, controller
    gone) before the KeyboardInterrupt goes on, so a notebook's kernel keeps no training running.
    What the run persisted stays for --resume."""
    import ray

    try:
        trainer.fit()
    except KeyboardInterrupt:
        if trainer.controller is not None:
            with contextlib.suppress(Exception):  # the controller exits as it aborts: RayActorError
                ray.get(trainer.controller.abort.remote(), timeout=60)
        raise


def announce_resume(name: str, run_url: str, num_to_keep: int) -> str | None:
    """Tell the user which checkpoint ``--resume`` continues from (the run's latest complete one, by
    lensray's record), with a warning when history.json records epochs that will run again; delete
    the folders an interruption left beyond ``num_to_keep`` (its workers ended with its driver)."""
    history = _history(run_url)
    prune_checkpoints(run_url, history, num_to_keep)
    complete = complete_checkpoints(run_url)
    recorded = max((int(row["epoch"]) for row in history), default=0)
    if not complete:
        log.warning(f"{run_url} has no complete checkpoint: run {name} starts again from epoch 1")
        return None
    epoch = max(complete)
    log.info(f"resuming run {name} after epoch {epoch} from {complete[epoch]}")
    if recorded > epoch:
        again = f"epoch {recorded} runs" if recorded == epoch + 1 else f"epochs {epoch + 1}-{recorded} run"
        log.warning(
            f"{run_url}/{HISTORY_FILE} records epochs up to {recorded}, but the latest complete checkpoint "
            f"is of epoch {epoch} (a later one was cut short): {again} again"
        )
    return complete[epoch]


def _interrupted(root: str, name: str) -> Interrupted:
    """Ctrl-C: what was saved, and the command that continues the run (its own config.yaml holds
    every setting; --out and --name because a generated name or the default out are not in it)."""
    run_url = storage.join(root, name)
    try:
        exists = _run_exists(run_url)
        complete = complete_checkpoints(run_url) if exists else {}
    except (OSError, CheckpointError):  # storage unreachable just now: the command is still the one to run
        exists, complete = True, {}
    if not exists:
        return Interrupted(f"interrupted before {run_url} finished an epoch: nothing to resume, start it again")
    after = f" after epoch {max(complete)}" if complete else ""
    config = storage.join(run_url, CONFIG_FILE)
    command = shlex.join(["lensray", "train", "--config", config, "--out", root, "--name", name, "--resume"])
    return Interrupted(f"interrupted{after}; continue with: {command}")


def _history(run_url: str) -> list[dict[str, Any]]:
    try:
        return json.loads(storage.read_bytes(storage.join(run_url, HISTORY_FILE)))
    except FileNotFoundError:
        return []


def with_store_layout(config: LensrayConfig, store: LensStore) -> LensrayConfig:
    """``config`` with the survey profile and bands of the store it trains on, so that the run's saved
    config says what the network takes (the flags of `lensray train` name only the store)."""
    bands = store.meta.get("bands")
    if not bands or not set(bands) <= set(store.profile.band_names):  # a store not written by `preprocess`
        return config
    data = config.data.model_copy(update={"profile": store.profile, "bands": tuple(bands)})
    return config.model_copy(update={"data": data})


def _check_run(config: LensrayConfig, resume: bool) -> tuple[str, str, list[LensStore]]:
    """The run's name, URL and stores, after checking the stores and that the run exists exactly when ``resume``."""
    if resume and config.train.name is None:
        raise TrainError("--resume needs the run's name (train.name / --name)")
    # Fail fast on a wrong URL, an unfinished or unlabelled store, stores that do not go together, a
    # network that does not fit train.init_from or train.freeze.
    stores = check_training(config)
    for store in stores:
        if len(store.indices("val")) < 2:
            raise TrainError(f"{store.url}: the validation split is too small to compute AUC")
    name = run_name(config)
    run_url = storage.join(runs_root(config), name)
    exists = _run_exists(run_url)
    if exists and not resume:
        raise TrainError(f"{run_url} already exists: pass --resume to continue it, or choose another --name")
    if resume and not exists:
        raise TrainError(f"nothing to resume at {run_url}")
    return name, run_url, list(stores)


def _run_exists(run_url: str) -> bool:
    """A run exists once it finished an epoch (a run that failed before that can be started again)."""
    return storage.exists(storage.join(run_url, HISTORY_FILE))


def run_outcome(run_url: str, wall_s: float) -> TrainOutcome:
    """The history and best checkpoint of a finished run, read back from its folder."""
    history = _history(run_url)
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
