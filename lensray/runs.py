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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from lensray import storage
from lensray.config import LensrayConfig, PreprocessConfig, config_from_dict, parse_yaml
from lensray.errors import CheckpointError, ConfigError, SearchError
from lensray.ingest.preprocess import describe, profile_of
from lensray.models import build_model, input_pixel_scale
from lensray.models.inference import predict
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
PREDICTIONS_FILE = "val_predictions.npz"
MODEL_INPUT_FILE = "model_input.json"  # the input geometry the network was built for
HISTORY_FILE = "history.json"
EPOCH_FILE = "epoch.json"  # {"epoch": n}: a checkpoint's epoch without downloading its state.pt
# Every file a checkpoint is read through. Ray uploads a checkpoint folder file by file in no set order, so
# a folder missing one is still being uploaded, being deleted, or was cut off (an endpoint lost mid-upload).
CHECKPOINT_FILES = frozenset({STATE_FILE, EPOCH_FILE, CONFIG_FILE, MODEL_INPUT_FILE})


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
    profile: SurveyProfile = PROFILES[DEFAULT_PROFILE]  # the survey layout of the training store's cutouts


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
        record = read_json(url, dict)
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
        profile = profile_of(transform)  # the survey layout the store was ingested from
        rebuilt = describe(preprocess, profile, bands)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{url}: unusable transform record {transform}: {exc}") from exc
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
        configured = describe(run_config.preprocess, profile, bands)
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
        profile=profile,
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
    Only complete checkpoints count (a ``checkpoint_*`` folder with every one of ``CHECKPOINT_FILES``).
    When the best epoch's checkpoint is not kept (deleted by ``train.num_to_keep``, or never written because the run
    stopped first), the best epoch among the kept checkpoints is returned instead of failing;
    ``best_epoch`` then names the better epoch that is gone. CheckpointError (naming the URL) when
    there is no history, no finite metric, or no complete checkpoint of a scored epoch.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    run_url = run_url.rstrip("/")
    try:
        history = read_json(storage.join(run_url, HISTORY_FILE), list)
    except FileNotFoundError:
        raise CheckpointError(f"{run_url} is not a run folder (no {HISTORY_FILE})") from None
    try:
        rows = {int(row["epoch"]): row for row in history if _finite(row.get(metric))}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{run_url}/{HISTORY_FILE}: rows without an epoch number (not written by lensray)"
        ) from None
    if not rows:
        raise CheckpointError(f"{run_url}/{HISTORY_FILE}: no epoch has a finite {metric}")
    sign = -1 if mode == "max" else 1
    ranked = sorted(rows, key=lambda epoch: (sign * rows[epoch][metric], epoch))  # best first; ties: earliest
    kept = complete_checkpoints(run_url)
    for epoch in ranked:
        if epoch in kept:
            return BestCheckpoint(url=kept[epoch], metrics=rows[epoch], best_epoch=ranked[0])
    raise CheckpointError(
        f"{run_url}: no complete checkpoint (checkpoint_* with {', '.join(sorted(CHECKPOINT_FILES))}) of an epoch with a finite "
        f"{metric}; checkpoints kept: epochs {sorted(kept)}"
    )


def read_json(url: str, kind: type) -> Any:
    """A JSON file of a run or checkpoint, which must hold a ``kind`` (dict or list). CheckpointError naming
    the URL when it is corrupt or truncated; FileNotFoundError when it is missing."""
    try:
        value = json.loads(storage.read_bytes(url))
    except ValueError:  # also a UnicodeDecodeError
        raise CheckpointError(f"{url} is not valid JSON: the file is corrupt or truncated") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{url} holds a {type(value).__name__}, not a {kind.__name__}: not written by lensray")
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def complete_checkpoints(run_url: str) -> dict[int, str]:
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
        if not files[name] >= CHECKPOINT_FILES:
            continue  # still being uploaded, being deleted, or cut off
        url = storage.join(run_url, name)
        epoch = _checkpoint_epoch(url)
        if epoch is not None:
            kept[epoch] = url
    return kept


def _checkpoint_epoch(url: str) -> int | None:
    record_url = storage.join(url, EPOCH_FILE)
    try:
        record = read_json(record_url, dict)
    except FileNotFoundError:
        return None  # deleted by the keep-N policy while we looked
    try:
        return int(record["epoch"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{record_url} has no epoch number: not written by lensray") from None


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
    mode on ``device``. CheckpointError naming the file when any part of the checkpoint is unusable."""
    checkpoint_url = resolve_checkpoint(checkpoint_url)
    device = torch.device(device)
    config = checkpoint_config(checkpoint_url)
    state = read_state(storage.join(checkpoint_url, STATE_FILE), device)
    geometry_url = storage.join(checkpoint_url, MODEL_INPUT_FILE)
    geometry = read_json(geometry_url, dict)
    try:
        scale = input_pixel_scale(geometry.get("transform"))  # the two-branch net pools NIR by it
        model = build_model(config.model, int(geometry["channels"]), int(geometry["size"]), scale)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{geometry_url}: no input channels and size to build the network for") from None
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{checkpoint_url}: the weights do not fit the network its config builds ({first})"
        ) from None
    model.to(device).eval()
    return Run(
        checkpoint_url=checkpoint_url,
        config=config,
        model=model,
        history=state["history"],
        epoch=state["epoch"],
        device=device,
    )


def checkpoint_config(checkpoint_url: str) -> LensrayConfig:
    """The run config saved in a checkpoint folder; CheckpointError naming it when it is not one."""
    url = storage.join(checkpoint_url, CONFIG_FILE)
    try:
        return config_from_dict(parse_yaml(storage.read_bytes(url), url), url)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


STATE_KEYS = ("model", "history", "epoch")


def read_state(url: str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's ``state.pt`` through ``torch.load(weights_only=True)``: tensors and plain containers
    only, so an edited file cannot run code. A file that is corrupt, truncated or holds anything else is
    a CheckpointError naming the URL; torch's own message is not passed on, as it suggests loading the
    file with ``weights_only`` off, which would run whatever the file holds."""
    data = storage.read_bytes(url)
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # whatever torch raises, the file is unusable and only its URL helps
        reason = type(exc).__name__
        raise CheckpointError(
            f"{url} is not a usable checkpoint state ({reason}): corrupt, truncated, or holding objects other "
            "than tensors, which lensray never loads"
        ) from None
    if not isinstance(state, dict) or not set(STATE_KEYS) <= set(state):
        raise CheckpointError(f"{url} holds no lensray training state (keys {', '.join(STATE_KEYS)})")
    return state


# --- reading a search (no cluster needed, no pickle) -----------------------------------------------

TUNE_CONFIG_FILE = "tune_config.yaml"  # the resolved search: its space names the keys a trial varied
ASHA_STOPS_FILE = "asha_stopped.json"
TRIAL_PREFIX = "trial_"  # each trial's folder: trial_<trial id>
TRIAL_RUN = "train"  # the Train run's folder inside each trial's folder
TRIAL_DONE_FILE = "trial_done.json"  # written once the trial's Train run returned
TUNE_ERROR_FILE = "error.txt"  # Ray Tune's plain-text error of a failed trial
TUNE_RESULT_FILE = "result.json"  # Ray Tune's JSON lines of reported results: read for timing only
METRICS = ("val_auc", "val_acc", "val_loss", "val_tpr0", "val_tpr10", "train_loss")  # reported every epoch
CURVE_COLUMNS = ("trial_id", "epoch", *METRICS, "lr", "epoch_s", "time_total_s")


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


@dataclass(frozen=True)
class TrialRecord:
    """One trial as its folder holds it: lensray's config and history, and Tune's text/JSON files."""

    trial_id: str
    run_url: str  # the trial's Train run
    status: str  # TERMINATED (finished or stopped by ASHA), ERROR, or UNFINISHED
    params: dict[str, Any]  # the searched keys' values
    history: list[dict[str, Any]]
    error: str | None
    stopped_by_asha: bool
    elapsed_s: dict[int, float]  # epoch -> Tune's time_total_s when it was reported


def _read_text(url: str) -> str | None:
    try:
        return storage.read_bytes(url).decode(errors="replace")
    except FileNotFoundError:
        return None


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _elapsed(trial_url: str) -> dict[int, float]:
    lines = (_read_text(storage.join(trial_url, TUNE_RESULT_FILE)) or "").splitlines()
    results = [json.loads(line) for line in lines if line.strip()]
    return {int(r["epoch"]): float(r["time_total_s"]) for r in results if "epoch" in r and "time_total_s" in r}


def _epochs_tune_saw(history: list[dict[str, Any]], elapsed: dict[int, float], stop: dict[str, Any] | None) -> list:
    """The history rows the search acted on. A trial keeps training for a moment after ASHA stops it or
    the search is interrupted: its history.json may run past what Tune recorded (``result.json``)."""
    if stop is not None:
        history = [row for row in history if int(row["epoch"]) <= int(stop["epoch"])]
    if elapsed:
        history = [row for row in history if int(row["epoch"]) in elapsed]
    return history


def read_trial(experiment_url: str, folder: str, space: list[str], stops: dict[str, Any]) -> TrialRecord:
    """A trial folder read through JSON/YAML/text only (never Ray's pickled experiment state)."""
    trial_url = storage.join(experiment_url, folder)
    run_url = storage.join(trial_url, TRIAL_RUN)
    config = yaml.safe_load(_read_text(storage.join(run_url, CONFIG_FILE)) or "{}") or {}
    trial_id = folder.removeprefix(TRIAL_PREFIX)
    elapsed = _elapsed(trial_url)
    history = _epochs_tune_saw(
        json.loads(_read_text(storage.join(run_url, HISTORY_FILE)) or "[]"), elapsed, stops.get(trial_id)
    )
    error = _read_text(storage.join(trial_url, TUNE_ERROR_FILE))
    done = storage.exists(storage.join(trial_url, TRIAL_DONE_FILE))
    status = "TERMINATED" if done or trial_id in stops else "ERROR" if error is not None else "UNFINISHED"
    return TrialRecord(
        trial_id=trial_id,
        run_url=run_url,
        status=status,
        params={key: _dotted(config, key) for key in space},
        history=history,
        error=error.strip() if error and status == "ERROR" else None,
        stopped_by_asha=trial_id in stops,
        elapsed_s=elapsed,
    )


def _trial_row(trial: TrialRecord, metric: str, mode: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """The trial's table row and its learning curve (epochs with a finite ``metric``)."""
    curve = pd.DataFrame([r for r in trial.history if _finite(r.get(metric))])
    row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status, **trial.params}
    row["epochs"] = max((int(r["epoch"]) for r in trial.history), default=0)
    row[f"best_{metric}"], row["best_epoch"] = math.nan, None
    if len(curve):
        curve["trial_id"] = trial.trial_id
        curve["time_total_s"] = curve["epoch"].map(trial.elapsed_s)
        position = curve[metric].idxmax() if mode == "max" else curve[metric].idxmin()
        row[f"best_{metric}"], row["best_epoch"] = float(curve.loc[position, metric]), int(curve.loc[position, "epoch"])
        first = curve.iloc[0]
        if _finite(first.get("time_total_s")):
            row["start_overhead_s"] = float(first["time_total_s"] - first["epoch_s"])
        row["run_url"] = trial.run_url
    row["stopped_by_asha"] = trial.stopped_by_asha
    row["error"] = trial.error
    return row, curve


def _search_space(experiment_url: str) -> list[str]:
    url = storage.join(experiment_url, TUNE_CONFIG_FILE)
    text = _read_text(url)
    if text is None:
        raise SearchError(f"no lensray search at {experiment_url} (no {TUNE_CONFIG_FILE})")
    spec = yaml.safe_load(text)
    if not isinstance(spec, dict) or not isinstance(spec.get("space"), dict):
        raise SearchError(f"{url}: not a lensray search file (no space mapping)")
    return list(spec["space"])


def summarise_experiment(experiment_url: str, metric: str = "val_auc", mode: str = "max") -> ExperimentSummary:
    """Read a search from storage (local or s3://) through lensray's own files and Tune's JSON/text ones,
    never a pickle: reading an experiment folder from anywhere cannot run code. The best trial is the
    one whose best epoch is best (ties: the earlier trial, as Tune's ``get_best_result(scope="all")``).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    experiment_url = experiment_url.rstrip("/")
    space = _search_space(experiment_url)
    stops = read_asha_stops(storage.join(experiment_url, ASHA_STOPS_FILE))
    folders = [f for f in storage.list_folders(experiment_url) if f.startswith(TRIAL_PREFIX)]
    trials = sorted((read_trial(experiment_url, f, space, stops) for f in folders), key=_creation_order)
    rows, curves, best = [], [], None
    for trial in trials:
        row, curve = _trial_row(trial, metric, mode)
        rows.append(row)
        if len(curve):
            curves.append(curve)
            value = row[f"best_{metric}"]
            if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
                keys = ("trial_id", "value", "best_epoch", "run_url")
                best = dict(zip(keys, (trial.trial_id, value, row["best_epoch"], trial.run_url), strict=True))
                best["params"] = trial.params
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(f"best_{metric}", ascending=mode == "min", na_position="last", kind="stable")
    frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=list(CURVE_COLUMNS))
    return ExperimentSummary(
        experiment_url=experiment_url,
        metric=metric,
        mode=mode,
        table=table.reset_index(drop=True),
        curves=frame[[c for c in CURVE_COLUMNS if c in frame]],
        best=best,
        unfinished=sum(trial.status == "UNFINISHED" for trial in trials),
    )


def _creation_order(trial: TrialRecord) -> tuple[int, str]:
    """Tune's trial IDs end in a running number (``a1b2c_00003``): the order the search created them."""
    suffix = trial.trial_id.rsplit("_", 1)[-1]
    return (int(suffix) if suffix.isdigit() else -1, trial.trial_id)


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
