"""Notebook entry points: load a trained run (or the best trial of a search) with no cluster running.

    run = lensray.load_run("s3://bucket/runs/lastro-1/checkpoint_...")
    run.config, run.history, run.metrics, run.predict(images)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from lensray import storage
from lensray.config import LensrayConfig, config_from_dict
from lensray.loop import predict
from lensray.models import build_model
from lensray.trainer import CONFIG_FILE, MODEL_INPUT_FILE, PREDICTIONS_FILE, STATE_FILE, CheckpointError, best_checkpoint

PREDICT_BATCH = 256


@dataclass
class Run:
    """A trained model in eval mode, with the config and metrics it was trained with."""

    checkpoint_url: str
    config: LensrayConfig
    model: torch.nn.Module
    history: list[dict[str, Any]]  # per-epoch metrics up to this checkpoint
    epoch: int
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the Tune trial behind it

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics of the epoch this checkpoint was saved at."""
        return self.history[self.epoch - 1] if 0 < self.epoch <= len(self.history) else {}

    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Lens probabilities for (N, C, H, W) images preprocessed like the training store."""
        tensor = torch.as_tensor(np.asarray(images, dtype=np.float32) if not torch.is_tensor(images) else images).float()
        if tensor.ndim != 4:
            raise ValueError(f"predict needs (N, C, H, W) images, got shape {tuple(tensor.shape)}")
        batches = (tensor[i : i + batch_size] for i in range(0, len(tensor), batch_size))
        return predict(self.model, batches, device=self.device)

    def val_predictions(self) -> dict[str, np.ndarray]:
        """The validation IDs, labels and scores stored with this checkpoint."""
        data = np.load(io.BytesIO(storage.read_bytes(storage.join(self.checkpoint_url, PREDICTIONS_FILE))))
        return {key: data[key] for key in data.files}


def load_run(checkpoint_url: str, device: str | torch.device = "cpu") -> Run:
    """The model of one checkpoint folder (local or s3://), in eval mode on ``device``."""
    device = torch.device(device)
    config = config_from_dict(
        yaml.safe_load(storage.read_bytes(storage.join(checkpoint_url, CONFIG_FILE))), f"{checkpoint_url}/{CONFIG_FILE}"
    )
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(checkpoint_url, STATE_FILE))),
                       map_location=device, weights_only=True)  # fmt: skip
    geometry = json.loads(storage.read_bytes(storage.join(checkpoint_url, MODEL_INPUT_FILE)))
    model = build_model(config.model, geometry["channels"], geometry["size"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return Run(checkpoint_url=checkpoint_url, config=config, model=model, history=state["history"],
               epoch=state["epoch"], device=device)  # fmt: skip


def load_best(experiment_url: str, metric: str = "val_auc", mode: str = "max", device: str | torch.device = "cpu") -> Run:
    """The best trial of a search (``lensray tune``), read from storage (local or s3://), no cluster needed.

    The best trial is the one whose best epoch by ``metric`` is best; the checkpoint loaded is that
    trial's best kept checkpoint by ``metric`` (``trainer.best_checkpoint``: ties -> the earliest epoch;
    ASHA-stopped trials included). ``run.info`` holds the trial (``trial_id``, ``params``, ``value``,
    ``best_epoch``, ``run_url``) and the whole search:
    ``results`` (one row per trial, best first) and ``curves`` (every reported epoch of every trial).
    """
    from lensray.tuning import SearchError, summarise_experiment

    summary = summarise_experiment(experiment_url, metric, mode)
    if summary.best is None:
        raise SearchError(f"{experiment_url}: no trial reported {metric} yet")
    try:
        best = best_checkpoint(summary.best["run_url"], metric, mode)
    except CheckpointError as exc:
        raise SearchError(f"{experiment_url}: best trial {summary.best['trial_id']}: {exc}") from exc
    run = load_run(best.url, device)
    run.info = {"experiment": experiment_url, "metric": metric, "mode": mode, **summary.best,
                "results": summary.table, "curves": summary.curves}  # fmt: skip
    return run
