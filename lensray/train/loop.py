"""The training loop in plain torch: one epoch, prediction, early stopping, LR plateau, the overfit
sanity check and resumable state. No Ray and no storage here: ``trainer.py`` wraps these per worker
(DDP model, sharded batches) and gathers validation scores across workers before computing metrics.

Batches are ``(images, labels)`` pairs: float32 (N, C, H, W) images and 0/1 labels of shape (N,).
The model maps images to one lens logit per image, shape (N,).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lensray.config import OptimConfig
from lensray.errors import SanityCheckError
from lensray.models.inference import Batch, _model_device, autocast, unwrap

_LN2 = math.log(2.0)  # the loss of a network that has learnt nothing on balanced classes


# --- optimiser, schedule, precision ------------------------------------------------------------


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over ``model``'s trainable parameters (SGD with the usual momentum 0.9); those
    frozen for fine-tuning (``requires_grad`` off) get no optimiser state and no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimiser {config.name!r}; choose adam, adamw or sgd")


class WarmupCosine:
    """Per-epoch LR: a linear ramp over ``warmup`` epochs (epoch e < warmup runs at lr * (e + 1) /
    (warmup + 1)), then a cosine from ``lr`` down to ``min_lr`` at the last of ``epochs``.

    Stepped once per epoch like the plateau schedule (``step(val_auc)``, the AUC unused); its state
    is the number of epochs stepped, so a restored schedule sets the LR it would have reached.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, epochs: int, warmup: int) -> None:
        if epochs < 1 or warmup < 0:
            raise ValueError(f"a cosine schedule needs epochs >= 1 and warmup >= 0, got {epochs} and {warmup}")
        self.optimizer = optimizer
        self.base_lr, self.min_lr = lr, min(min_lr, lr)
        self.epochs, self.warmup = epochs, warmup
        self.epoch = 0
        self._apply()

    def lr_at(self, epoch: int) -> float:
        """The LR of epoch ``epoch`` (0-based)."""
        if epoch < self.warmup:
            return self.base_lr * (epoch + 1) / (self.warmup + 1)
        span = max(1, self.epochs - 1 - self.warmup)
        progress = min(1.0, (epoch - self.warmup) / span)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.epoch)

    def step(self, metric: float | None = None) -> None:
        """End of an epoch: set the next epoch's LR."""
        self.epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cosine", "epoch": self.epoch, "warmup": self.warmup, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "cosine":
            raise ValueError("cannot restore: the checkpoint's LR schedule is not a cosine schedule (optim.schedule)")
        self.epoch = int(state["epoch"])
        self._apply()


Scheduler = ReduceLROnPlateau | WarmupCosine


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, epochs: int | None = None) -> Scheduler:
    """The LR schedule of ``config.schedule``, stepped once per epoch with the validation AUC:
    ``scheduler.step(val_auc)``.

    ``plateau``: multiply the LR by ``plateau_factor`` once more than ``plateau_patience`` epochs in
    a row bring no val AUC gain (patience 3: on the 4th), never below ``min_lr`` (a NaN AUC counts
    as no gain). ``cosine``: ``WarmupCosine`` over ``epochs`` (``train.epochs``) with
    ``warmup_epochs``.
    """
    if config.schedule == "cosine":
        if epochs is None:
            raise ValueError("a cosine schedule needs the number of epochs (train.epochs)")
        return WarmupCosine(optimizer, config.lr, config.min_lr, epochs, config.warmup_epochs)
    return ReduceLROnPlateau(
        optimizer,
        mode="max",
        factor=config.plateau_factor,
        patience=config.plateau_patience,
        min_lr=config.min_lr,
    )


def make_ema(model: nn.Module, config: OptimConfig) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights (``optim.ema_decay``), batch-norm
    statistics included; None when off. Build it from the bare model, before DDP wraps it, and call
    ``update_parameters(model)`` after every optimiser step (``train_one_epoch(ema=...)``)."""
    if config.ema_decay is None:
        return None
    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)


def amp_settings(mode: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """``(autocast dtype, grad scaler)`` for the config's ``train.amp`` on ``device``.

    ``auto``: bf16 on a GPU that supports it, else fp16 with a GradScaler; full precision on CPU,
    where autocast is slower than float32 for these small convnets. ``off``: full precision.
    """
    device = torch.device(device)
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None, None
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return torch.bfloat16, None
    if mode == "fp16":
        # fp16 gradients underflow without loss scaling.
        return torch.float16, torch.amp.GradScaler(device.type)
    raise ValueError(f"unknown amp mode {mode!r}; choose auto, bf16, fp16 or off")


# --- one epoch, prediction ---------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_sync_context: contextlib.AbstractContextManager | None = None,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` with binary cross-entropy on the logits.

    ``amp_dtype`` (bf16 / fp16) runs the forward pass under ``torch.autocast``; fp16 needs ``scaler``.
    ``grad_sync_context`` is entered around the whole epoch, e.g. DDP's ``model.join()`` when ranks
    may get different numbers of batches. ``ema`` (``make_ema``) is updated after every step.
    Returns this process's ``{"loss"`` (mean per sample), ``"samples", "seconds", "samples_per_s"}``;
    raises ``FloatingPointError`` when the loss diverged.
    """
    device = torch.device(device)
    if amp_dtype == torch.float16 and scaler is None:
        raise ValueError("fp16 autocast needs a GradScaler (see amp_settings); bf16 does not")
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    # Summed on the device: a .item() per step would stall a GPU on every batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    start = time.perf_counter()
    with grad_sync_context if grad_sync_context is not None else contextlib.nullcontext():
        for images, labels in batches:
            labels = labels.to(device, dtype=torch.float32, non_blocking=True)
            loss = _train_step(
                model, images.to(device, non_blocking=True), labels, optimizer, loss_fn, amp_dtype, scaler
            )
            if ema is not None:
                ema.update_parameters(unwrap(model))
            loss_sum += loss.detach().double() * labels.numel()
            samples += labels.numel()
    if samples == 0:
        raise ValueError("train_one_epoch got no batches: the feed is empty (check steps and batch size)")
    mean_loss = loss_sum.item() / samples
    seconds = time.perf_counter() - start
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"training loss is {mean_loss} after {samples} samples: the run diverged "
            "(lower the learning rate, or use bf16 / fp32 instead of fp16)"
        )
    return {"loss": mean_loss, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def _train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor:
    """One optimiser step on one batch (already on the device); returns the batch's mean loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, amp_dtype):
        logits = model(images)
    loss = loss_fn(logits.float(), labels)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


# --- early stopping ----------------------------------------------------------------------------


class EarlyStopping:
    """Stop after ``patience`` epochs without improving the best value by more than ``min_delta``.

    ``patience=None`` never stops (still tracks the best). NaN never counts as an improvement.
    """

    def __init__(self, patience: int | None, mode: str = "max", min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience}")
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_epochs = 0
        self.improved = False  # whether the last step set a new best (e.g. to save a best checkpoint)

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def step(self, value: float) -> bool:
        """Record this epoch's value; True when training should stop now."""
        self.improved = self._is_better(value)
        if self.improved:
            self.best = float(value)
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "improved": self.improved,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patience = state["patience"]
        self.mode = state["mode"]
        self.min_delta = state["min_delta"]
        self.best = state["best"]
        self.bad_epochs = state["bad_epochs"]
        self.improved = state["improved"]


# --- overfit sanity check ----------------------------------------------------------------------


@dataclass(frozen=True)
class SanityResult:
    losses: list[float]  # training loss at every step (train mode: dropout on)
    start: float  # training loss at the first step
    end: float  # eval-mode loss over all the check's images after the last step: what is judged
    limit: float  # ``end`` had to get under this
    seconds: float

    @property
    def passed(self) -> bool:
        return self.end < self.limit


# Judged in eval mode (no dropout, batch-norm running statistics), so the verdict is about what the
# network has fitted, not dropout noise, and it catches the study's block order, whose train-mode loss
# does fall on one fixed batch but whose eval-mode predictions on that batch stay poor (BN after the
# ReLUs). Measured on 64 simulated 4x50x50 cutouts, two batches of 32, 60 steps, 5 seeds: LASTRO
# bn_relu without conv dropout, Adam 3e-4 -> 0.03-0.07; ResNet-20 -> <= 0.06; the paper recipe
# (block_order=paper, Dropout2d 0.2, Adam 1e-3) -> 0.38-0.52 with Kaiming init, 0.48-0.77 with
# torch's; conv Dropout(0.2) -> 0.59-0.66 (it cannot overfit 256 images in 31 epochs either).
SANITY_MAX_LOSS = 0.2


def _fixed_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    count = max(1, math.ceil(x.shape[0] / batch_size))
    return list(zip(torch.tensor_split(x, count), torch.tensor_split(y, count), strict=False))


def sanity_check(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer],
    steps: int,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    max_loss: float = SANITY_MAX_LOSS,
) -> SanityResult:
    """Overfit a small fixed set and demand that the network fits it; fail fast when it cannot.

    Trains a fresh optimiser for ``steps`` steps, cycling over the images in fixed batches of about
    ``batch_size`` (in order, no augmentation) with the model in train mode, then measures the loss
    over all of them in eval mode. 64 images in two batches of 32 for 60 steps (~2-3 s for LASTRO
    at 50 px on 2 CPU cores) separate the recipes that learn from those that do not (see
    ``SANITY_MAX_LOSS``); a single batch is a weaker test. Afterwards the weights, batch-norm
    statistics, training mode and RNG streams are as before: the check leaves no trace in the
    training that follows. Run it on the bare model, before wrapping it in DDP. Raises
    ``SanityCheckError`` when the eval-mode loss is not under ``max_loss``.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    x, y = _sanity_inputs(images, labels, device, steps, batch_size)
    batches = _fixed_batches(x, y, batch_size)
    saved_weights = copy.deepcopy(model.state_dict())
    was_training = model.training
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            losses, end = _overfit(model, batches, optimizer_factory(model), steps)
    finally:
        model.load_state_dict(saved_weights)
        model.train(was_training)
    result = SanityResult(losses=losses, start=losses[0], end=end, limit=max_loss, seconds=time.perf_counter() - start)
    if not result.passed:
        raise _sanity_failure(result, steps, n=y.numel(), n_pos=int(y.sum().item()))
    return result


def _sanity_inputs(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    device: torch.device,
    steps: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The check's images and labels as float tensors on ``device``; ValueError on unusable inputs."""
    x = torch.as_tensor(images).float().to(device)
    y = torch.as_tensor(labels).float().to(device)
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ValueError(
            f"sanity check needs (N, C, H, W) images and (N,) labels, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if steps < 1 or batch_size < 2:
        raise ValueError(f"sanity check needs steps >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    n_pos = int(y.sum().item())
    if n_pos in (0, y.numel()):
        raise ValueError(f"sanity check images need both classes; got {n_pos} lenses of {y.numel()}")
    return x, y


def _overfit(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer, steps: int
) -> tuple[list[float], float]:
    """Train ``steps`` steps cycling over ``batches``; (training loss per step, eval-mode loss over all)."""
    loss_fn = nn.BCEWithLogitsLoss()
    losses: list[float] = []
    model.train()
    for step in range(steps):
        batch_x, batch_y = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch_x), batch_y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        total = sum(loss_fn(model(bx), by).item() * by.numel() for bx, by in batches)
    return losses, total / sum(by.numel() for _, by in batches)


def _sanity_failure(result: SanityResult, steps: int, n: int, n_pos: int) -> SanityCheckError:
    tail = float(np.mean(result.losses[-5:]))
    return SanityCheckError(
        f"sanity check failed: the model cannot fit {n} fixed images ({n_pos} lenses). "
        f"After {steps} steps the eval-mode loss on them is {result.end:.3f} (needed < {result.limit:.3f}; "
        f"ln 2 = {_LN2:.3f} is guessing); training loss {result.start:.3f} -> {tail:.3f}. A network "
        "that cannot overfit a few dozen images will not learn from the full set. Typical causes: "
        "the learning rate (zero, or too high: try Adam 3e-4); the block order "
        "(model.lastro.block_order=paper puts BN after the ReLUs: use bn_relu); dropout in the conv "
        "blocks (model.lastro.dropout_kind=none); unnormalised inputs (preprocess.mode=asinh). "
        "Set train.sanity=false to train anyway."
    )


# --- resumable state ---------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every RNG stream training draws from (dropout, numpy, python), in torch-loadable types."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            **numpy_state,
            "state": {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"]},
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": numpy_state["state"]["pos"],
    }
    np.random.set_state(numpy_state)
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LoopState:
    """Everything needed to continue a run exactly: weights, optimiser, LR schedule, early stopping,
    grad scaler, weight average, RNG streams, the epoch count and the metrics history.

    ``epoch`` is the number of completed epochs: a resumed run's next epoch is ``state.epoch``.
    ``model`` holds the weights to predict with (what ``runs.load_run`` loads): the EMA of the
    weights when ``optim.ema_decay`` is set, else the trained weights. With an EMA, ``trained``
    holds the trained weights a resumed run continues from and ``ema_steps`` the steps averaged.
    The feed needs no state: its sampling and augmentation are seeded from (seed, epoch, rank).
    """

    epoch: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = None
    early_stopping: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=capture_rng)
    trained: dict[str, Any] | None = None  # with an EMA: the trained (not averaged) weights
    ema_steps: int | None = None  # with an EMA: its n_averaged

    @classmethod
    def capture(
        cls,
        *,
        epoch: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler | None = None,
        early_stopping: EarlyStopping | None = None,
        scaler: torch.amp.GradScaler | None = None,
        history: Iterable[dict[str, Any]] = (),
        ema: AveragedModel | None = None,
    ) -> LoopState:
        """A snapshot (deep copies: later training does not change it); call after an epoch ends."""
        # state_dict() tensors share storage with the live parameters: copy them.
        trained = copy.deepcopy(unwrap(model).state_dict())
        return cls(
            epoch=epoch,
            model=copy.deepcopy(ema.module.state_dict()) if ema is not None else trained,
            trained=trained if ema is not None else None,
            ema_steps=int(ema.n_averaged.item()) if ema is not None else None,
            optimizer=copy.deepcopy(optimizer.state_dict()),
            scheduler=copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
            early_stopping=early_stopping.state_dict() if early_stopping is not None else None,
            scaler=scaler.state_dict() if scaler is not None else None,
            history=copy.deepcopy(list(history)),
            rng=capture_rng(),
        )

    def restore(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Scheduler | None = None,
        early_stopping: EarlyStopping | None = None,
        scaler: torch.amp.GradScaler | None = None,
        ema: AveragedModel | None = None,
    ) -> None:
        """Load the snapshot into freshly built objects (of the same config) and the RNG streams."""
        for name, target, saved in (
            ("scheduler", scheduler, self.scheduler),
            ("early_stopping", early_stopping, self.early_stopping),
            ("weight average (optim.ema_decay)", ema, self.trained),
        ):
            if (target is None) != (saved is None):
                have = "was" if saved is not None else "was not"
                raise ValueError(
                    f"cannot restore: the checkpoint's {name} {have} saved, "
                    f"but one {'was not' if target is None else 'was'} given"
                )
        unwrap(model).load_state_dict(self.trained if ema is not None else self.model)
        if ema is not None:
            ema.module.load_state_dict(self.model)
            ema.n_averaged.fill_(self.ema_steps or 0)
        optimizer.load_state_dict(self.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(self.scheduler)
        if early_stopping is not None:
            early_stopping.load_state_dict(self.early_stopping)
        if scaler is not None and self.scaler:
            scaler.load_state_dict(self.scaler)
        restore_rng(self.rng)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "early_stopping": self.early_stopping,
            "scaler": self.scaler,
            "history": self.history,
            "rng": self.rng,
            "trained": self.trained,
            "ema_steps": self.ema_steps,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoopState:
        return cls(**state)  # a checkpoint from before the EMA fields gets their defaults (None)

    def save(self, path: str | Path) -> None:
        """Write to a local file (a Ray Train checkpoint folder, say)."""
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path | BinaryIO, map_location: torch.device | str | None = "cpu") -> LoopState:
        # weights_only: only tensors and plain containers, so loading a checkpoint runs no code.
        return cls.from_dict(torch.load(path, map_location=map_location, weights_only=True))
