"""Forward passes of a lens network without gradients: lens probabilities for image batches.

Shared by the training loop (validation), a loaded run (``runs.Run.predict``) and evaluation. Plain
torch: no Ray, no storage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _images_of(batch: torch.Tensor | Batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def _scores_and_labels(
    model: nn.Module, batches: Iterable[Any], device: torch.device | str | None, amp_dtype: torch.dtype | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    scores, labels = [], []
    try:
        for batch in batches:
            with autocast(device, amp_dtype):
                logits = model(_images_of(batch).to(device, non_blocking=True))
            # float64 sigmoid: in float32 every logit above ~17 becomes exactly 1.0, and the ties
            # among confident candidates would blur the top of the ranking (TPR0).
            scores.append(torch.sigmoid(logits.double()).cpu().numpy())
            if isinstance(batch, (tuple, list)):
                labels.append(np.asarray(batch[1]).astype(np.int8).ravel())
    finally:
        model.train(was_training)
    return scores, labels


def predict(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Batch],
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Lens probabilities (float64 sigmoid of the logits) for image batches or (images, labels) pairs.

    Runs in eval mode without gradients and puts the model back in the mode it was in. ``device``
    defaults to the model's.
    """
    scores, _ = _scores_and_labels(model, batches, device, amp_dtype)
    return np.concatenate(scores) if scores else np.empty(0)


def validate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, scores)`` over ``(images, labels)`` batches; the caller computes the metrics, so that
    a distributed trainer can gather every worker's share first. Call it on the unwrapped model
    (``unwrap``): no collective communication is needed for inference.
    """
    scores, labels = _scores_and_labels(model, batches, device, amp_dtype)
    if not scores:
        return np.empty(0, dtype=np.int8), np.empty(0)
    return np.concatenate(labels), np.concatenate(scores)
