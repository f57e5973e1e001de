"""The run contract: what a training run leaves in storage, and the readers of runs and searches.

A run folder (``train.out/<name>``, local or s3://) holds ``config.yaml``, ``history.json`` (one row per
epoch), ``tensorboard/`` and ``checkpoint_*`` folders; each checkpoint holds ``state.pt`` (weights and
loop state, read with ``weights_only=True``), ``epoch.json``, ``config.yaml``, ``model_input.json`` (the
input contract: bands, geometry, the store's transform) and ``val_predictions.npz``. Everything here
reads storage only, no cluster: the notebook entry points work on a laptop against an S3 bucket::

    run = lensray.load_run("s3://bucket/runs/lastro-1")          # a run folder or one checkpoint
    run = lensray.load_best("s3://bucket/experiments/lastro-search")
    run.config, run.history, run.metrics, run.predict(images)
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from lensray import storage
from lensray.config import LensrayConfig, PreprocessConfig, config_from_dict
from lensray.errors import CheckpointError, SearchError
from lensray.ingest.preprocess import describe
from lensray.models import build_model
from lensray.models.inference import predict

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
PREDICTIONS_FILE = "val_predictions.npz"
MODEL_INPUT_FILE = "model_input.json"  # the input geometry the network was built for
HISTORY_FILE = "history.json"
EPOCH_FILE = "epoch.json"  # {"epoch": n}: a checkpoint's epoch without downloading its state.pt


# --- the input contract of a checkpoint --------------------------------------------------------


@dataclass(frozen=True)
class ModelInput:
    """What the network of a checkpoint expects: bands, geometry and the store's recorded transform."""

    bands: tuple[str, ...]
    channels: int
    size: int
    preprocess: PreprocessConfig
    store: str | None
    notes: tuple[str, ...] = ()  # differences from the run's config (the store's record wins)


def model_input(checkpoint_url: str, run_config: Any | None = None) -> ModelInput:
    """The checkpoint's ``model_input.json`` as a ``PreprocessConfig`` that reproduces its transform.

    The store's recorded transform is what the weights were fitted to, so it is the authority: it is
    rebuilt as a ``PreprocessConfig`` and ``transforms.describe`` of that must equal the record exactly
    (else this lensray would preprocess differently from the one that wrote the store: an error). Where
    the run's own config (``preprocess``, ``data.bands``) says otherwise, e.g. a run trained with
    ``--store`` on a store ingested with another config, the difference is returned in ``notes``.
    """
    url = storage.join(checkpoint_url, MODEL_INPUT_FILE)
    try:
        record = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise CheckpointError(f"{url} is missing: {checkpoint_url} is not a lensray checkpoint folder") from None
    transform, bands = record.get("transform"), record.get("bands")
    if not transform or not bands:
        raise CheckpointError(
            f"{url}: the training store {record.get('store')} recorded no transform/bands (not written by "
            "`lensray preprocess`), so raw cutouts cannot be prepared the way this network saw its inputs"
        )
    try:
        preprocess = PreprocessConfig(
            mode=transform["mode"],
            upsample=transform["interpolation"],
            asinh_softening=transform["asinh_softening"],
            border=transform["border"],
            crop=transform["crop"],
            bin=transform["bin"],
            dtype=transform["dtype"],
        )
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{url}: unusable transform record {transform}: {exc}") from exc
    rebuilt = describe(preprocess)
    differing = sorted(k for k in set(rebuilt) | set(transform) if rebuilt.get(k) != transform.get(k))
    if differing:
        details = ", ".join(f"{k}: recorded {transform.get(k)!r}, this lensray {rebuilt.get(k)!r}" for k in differing)
        raise CheckpointError(f"{url}: this lensray cannot reproduce the training transform ({details})")
    if rebuilt["output_shape"] != [record["size"], record["size"]]:
        raise CheckpointError(
            f"{url}: transform output {rebuilt['output_shape']} != network input size {record['size']}"
        )
    notes = []
    if run_config is not None:
        configured = describe(run_config.preprocess)
        for key in sorted(k for k in configured if configured[k] != transform.get(k)):
            notes.append(
                f"run config preprocess {key}={configured[key]!r}, training store {transform.get(key)!r} (used)"
            )
        if tuple(run_config.data.bands) != tuple(bands):
            notes.append(f"run config bands {list(run_config.data.bands)}, training store {bands} (used)")
    return ModelInput(
        bands=tuple(bands),
        channels=int(record["channels"]),
        size=int(record["size"]),
        preprocess=preprocess,
        store=record.get("store"),
        notes=tuple(notes),
    )


# --- the best checkpoint of a run -----------------------------------------------------------------


@dataclass(frozen=True)
class BestCheckpoint:
    url: str  # the checkpoint folder
    metrics: dict[str, Any]  # its epoch's row of history.json
    best_epoch: int  # the run's best epoch; differs from metrics["epoch"] when its checkpoint is gone or incomplete


def best_checkpoint(run_url: str, metric: str = "val_auc", mode: str = "max") -> BestCheckpoint:
    """The kept checkpoint of a Train run folder (local or s3://) with the best ``metric``; no Ray needed.

    The one rule behind ``train``'s outcome, ``evaluate``/``compare``/``score`` on a run folder and
    ``load_best``: epochs are ranked by ``metric`` in the run's ``history.json`` (``mode`` "max" or
    "min"); ties go to the earliest epoch; an epoch whose metric is NaN, None or missing never wins.
    Only complete checkpoints count (a ``checkpoint_*`` folder with its ``state.pt``). When the best
    epoch's checkpoint is not kept (deleted by ``train.num_to_keep``, or never written because the run
    stopped first), the best epoch among the kept checkpoints is returned instead of failing;
    ``best_epoch`` then names the better epoch that is gone. CheckpointError (naming the URL) when
    there is no history, no finite metric, or no complete checkpoint of a scored epoch.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    run_url = run_url.rstrip("/")
    try:
        history = json.loads(storage.read_bytes(storage.join(run_url, HISTORY_FILE)))
    except FileNotFoundError:
        raise CheckpointError(f"{run_url} is not a run folder (no {HISTORY_FILE})") from None
    rows = {int(row["epoch"]): row for row in history if _finite(row.get(metric))}
    if not rows:
        raise CheckpointError(f"{run_url}/{HISTORY_FILE}: no epoch has a finite {metric}")
    sign = -1 if mode == "max" else 1
    ranked = sorted(rows, key=lambda epoch: (sign * rows[epoch][metric], epoch))  # best first; ties: earliest
    kept = _kept_checkpoints(run_url)
    for epoch in ranked:
        if epoch in kept:
            return BestCheckpoint(url=kept[epoch], metrics=rows[epoch], best_epoch=ranked[0])
    raise CheckpointError(
        f"{run_url}: no complete checkpoint (checkpoint_*/{STATE_FILE}) of an epoch with a finite "
        f"{metric}; checkpoints kept: epochs {sorted(kept)}"
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kept_checkpoints(run_url: str) -> dict[int, str]:
    """Epoch -> URL of each complete checkpoint folder, from one recursive listing of the run folder."""
    import pyarrow.fs as pafs

    fs, root = storage.arrow_filesystem(run_url)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise CheckpointError(f"cannot list {run_url}: {exc}") from exc
    files: dict[str, set[str]] = {}
    for entry in entries:
        parts = entry.path[len(root) :].strip("/").split("/")
        if len(parts) == 2 and parts[0].startswith("checkpoint_") and entry.type == pafs.FileType.File:
            files.setdefault(parts[0], set()).add(parts[1])
    kept: dict[int, str] = {}
    # Ray names folders by time, so sorting makes a newer folder win an epoch held twice (a worker
    # restart that went back one epoch): it matches the history.json that run rewrote.
    for name in sorted(files):
        if STATE_FILE not in files[name]:
            continue  # still being uploaded, or being deleted
        url = storage.join(run_url, name)
        epoch = _checkpoint_epoch(url, EPOCH_FILE in files[name])
        if epoch is not None:
            kept[epoch] = url
    return kept


def _checkpoint_epoch(url: str, has_epoch_file: bool) -> int | None:
    try:
        if has_epoch_file:
            return int(json.loads(storage.read_bytes(storage.join(url, EPOCH_FILE)))["epoch"])
        # Runs written before epoch.json: the epoch is only inside the weights file.
        state = torch.load(
            io.BytesIO(storage.read_bytes(storage.join(url, STATE_FILE))), map_location="cpu", weights_only=True
        )
        return int(state["epoch"])
    except FileNotFoundError:
        return None  # deleted by the keep-N policy while we looked


def is_checkpoint(url: str) -> bool:
    return storage.exists(storage.join(url, MODEL_INPUT_FILE))


def resolve_checkpoint(url: str) -> str:
    """A checkpoint folder as is; a run folder -> its best checkpoint (``best_checkpoint``'s rule)."""
    url = url.rstrip("/")
    if is_checkpoint(url):
        return url
    try:
        return best_checkpoint(url).url
    except CheckpointError as exc:
        raise CheckpointError(f"{url} is not a checkpoint folder (no {MODEL_INPUT_FILE}); {exc}") from exc


# --- a loaded model ---------------------------------------------------------------------------------


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
        tensor = torch.as_tensor(
            np.asarray(images, dtype=np.float32) if not torch.is_tensor(images) else images
        ).float()
        if tensor.ndim != 4:
            raise ValueError(f"predict needs (N, C, H, W) images, got shape {tuple(tensor.shape)}")
        batches = (tensor[i : i + batch_size] for i in range(0, len(tensor), batch_size))
        return predict(self.model, batches, device=self.device)

    def val_predictions(self) -> dict[str, np.ndarray]:
        """The validation IDs, labels and scores stored with this checkpoint."""
        data = np.load(io.BytesIO(storage.read_bytes(storage.join(self.checkpoint_url, PREDICTIONS_FILE))))
        return {key: data[key] for key in data.files}


def load_run(checkpoint_url: str, device: str | torch.device = "cpu") -> Run:
    """The model of a checkpoint folder, or of a run folder's best checkpoint (local or s3://), in eval
    mode on ``device``."""
    checkpoint_url = resolve_checkpoint(checkpoint_url)
    device = torch.device(device)
    config = config_from_dict(
        yaml.safe_load(storage.read_bytes(storage.join(checkpoint_url, CONFIG_FILE))), f"{checkpoint_url}/{CONFIG_FILE}"
    )
    state = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(checkpoint_url, STATE_FILE))), map_location=device, weights_only=True
    )
    geometry = json.loads(storage.read_bytes(storage.join(checkpoint_url, MODEL_INPUT_FILE)))
    model = build_model(config.model, geometry["channels"], geometry["size"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return Run(
        checkpoint_url=checkpoint_url,
        config=config,
        model=model,
        history=state["history"],
        epoch=state["epoch"],
        device=device,
    )


# --- reading a search (no cluster needed) ---------------------------------------------------------


ASHA_STOPS_FILE = "asha_stopped.json"
TRIAL_RUN = "train"  # the Train run's folder inside each trial's folder
METRICS = ("val_auc", "val_acc", "val_loss", "val_tpr0", "val_tpr10", "train_loss")  # reported every epoch


def read_asha_stops(stops_url: str) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(storage.read_bytes(stops_url))
    except FileNotFoundError:
        return {}


@dataclass
class ExperimentSummary:
    """One row per trial (best first), every reported epoch of every trial, and the best trial."""

    experiment_url: str
    metric: str
    mode: str
    table: pd.DataFrame  # trial_id, status, params..., epochs, best_<metric>, best_epoch, stopped_by_asha, ...
    curves: pd.DataFrame  # trial_id plus every reported metric, one row per trial and epoch
    best: dict[str, Any] | None  # trial_id, params, value, best_epoch, run_url of the best trial
    unfinished: int = 0  # trials neither finished nor failed: the search was interrupted

    @property
    def stopped_early(self) -> int:
        return int(self.table["stopped_by_asha"].sum()) if len(self.table) else 0


def _experiment_analysis(experiment_url: str) -> Any:
    from ray.tune import ExperimentAnalysis

    filesystem = storage.arrow_filesystem(experiment_url)[0] if storage.is_s3(experiment_url) else None
    try:
        return ExperimentAnalysis(storage.strip_scheme(experiment_url), storage_filesystem=filesystem)
    except (FileNotFoundError, ValueError) as exc:
        raise SearchError(f"no Tune experiment at {experiment_url}: {exc}") from exc


def summarise_experiment(experiment_url: str, metric: str = "val_auc", mode: str = "max") -> ExperimentSummary:
    """Read an experiment's trials from storage (local or s3://); the best trial is the one whose best
    epoch is best (ties: the earlier trial, as Tune's ``get_best_result(scope="all")``)."""
    from ray.tune import ResultGrid

    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    analysis = _experiment_analysis(experiment_url)
    grid = ResultGrid(analysis)
    stops = read_asha_stops(storage.join(experiment_url, ASHA_STOPS_FILE))
    rows, curves, best = [], [], None
    for trial, result in zip(analysis.trials, grid, strict=False):
        frame = result.metrics_dataframe
        params = dict(trial.config)
        row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status, **params}
        scored = frame.dropna(subset=[metric]) if frame is not None and metric in frame else pd.DataFrame()
        row["epochs"] = int(frame["epoch"].max()) if frame is not None and "epoch" in frame and len(frame) else 0
        row[f"best_{metric}"], row["best_epoch"] = math.nan, None
        if len(scored):
            position = scored[metric].idxmax() if mode == "max" else scored[metric].idxmin()
            row[f"best_{metric}"], row["best_epoch"] = (
                float(scored.loc[position, metric]),
                int(scored.loc[position, "epoch"]),
            )
            row["start_overhead_s"] = float(scored["time_total_s"].iloc[0] - scored["epoch_s"].iloc[0])
            checkpoint = scored.loc[position].get("checkpoint_path")
            run_folder = (
                os.path.basename(os.path.dirname(str(checkpoint))) if isinstance(checkpoint, str) else TRIAL_RUN
            )
            # Relative to the URL given, so an experiment copied elsewhere still resolves.
            row["run_url"] = storage.join(experiment_url, os.path.basename(trial.path), run_folder)
            curves.append(scored.assign(trial_id=trial.trial_id))
            value = row[f"best_{metric}"]
            if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
                best = {
                    "trial_id": trial.trial_id,
                    "params": params,
                    "value": value,
                    "best_epoch": row["best_epoch"],
                    "run_url": row["run_url"],
                }
        row["stopped_by_asha"] = trial.trial_id in stops
        row["error"] = str(result.error) if result.error is not None else None
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(f"best_{metric}", ascending=mode == "min", na_position="last", kind="stable")
    keep = ["trial_id", "epoch", *METRICS, "lr", "epoch_s", "time_total_s"]
    curves_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=keep)
    unfinished = sum(trial.status not in ("TERMINATED", "ERROR") for trial in analysis.trials)
    return ExperimentSummary(
        experiment_url=experiment_url,
        metric=metric,
        mode=mode,
        table=table.reset_index(drop=True),
        curves=curves_frame[[c for c in keep if c in curves_frame]],
        best=best,
        unfinished=unfinished,
    )


def load_best(
    experiment_url: str, metric: str = "val_auc", mode: str = "max", device: str | torch.device = "cpu"
) -> Run:
    """The best trial of a search (``lensray tune``), read from storage (local or s3://), no cluster needed.

    The best trial is the one whose best epoch by ``metric`` is best; the checkpoint loaded is that
    trial's best kept checkpoint by ``metric`` (``best_checkpoint``: ties -> the earliest epoch;
    ASHA-stopped trials included). ``run.info`` holds the trial (``trial_id``, ``params``, ``value``,
    ``best_epoch``, ``run_url``) and the whole search:
    ``results`` (one row per trial, best first) and ``curves`` (every reported epoch of every trial).
    """
    summary = summarise_experiment(experiment_url, metric, mode)
    if summary.best is None:
        raise SearchError(f"{experiment_url}: no trial reported {metric} yet")
    try:
        best = best_checkpoint(summary.best["run_url"], metric, mode)
    except CheckpointError as exc:
        raise SearchError(f"{experiment_url}: best trial {summary.best['trial_id']}: {exc}") from exc
    run = load_run(best.url, device)
    run.info = {
        "experiment": experiment_url,
        "metric": metric,
        "mode": mode,
        **summary.best,
        "results": summary.table,
        "curves": summary.curves,
    }
    return run
