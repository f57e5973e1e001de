"""Compare trained runs side by side: a Table-I-style table (network, options, ACC, AUC, TPR0, TPR10,
epochs, training time) and their ROC curves overlaid, as Markdown, HTML and JSON.

Each run is scored on the test split of the store it was trained on (recorded in its checkpoint), so
runs trained under different label rules -- one store per rule -- are each judged by their own labels.
A run folder stands for its best checkpoint (highest ``val_auc``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensray import metrics, storage
from lensray.config import LensrayConfig
from lensray.evaluate import EvaluateError, jsonable, predict_split, resolve_checkpoint
from lensray.trainer import HISTORY_FILE, MODEL_INPUT_FILE

COLUMNS = ("name", "network", "options", "label_rule", "acc", "auc", "tpr0", "tpr10", "best_epoch", "epochs", "train_images", "train_s")
HEADERS = ("run", "network", "options", "labels", "ACC", "AUC", "TPR0", "TPR10", "best epoch", "epochs", "images seen", "train time (s)")


def describe_network(config: LensrayConfig) -> str:
    model = config.model
    if model.name == "resnet":
        return f"ResNet-{6 * model.resnet.blocks + 2}"
    lastro = model.lastro
    return f"LASTRO {lastro.pairs}x2 conv, {lastro.filters} filters"


def describe_options(config: LensrayConfig, mode: str | None) -> str:
    """The recipe in a few words: preprocessing, block order, dropout, optimiser, batch, augmentation."""
    parts = [mode or config.preprocess.mode]
    if config.model.name == "lastro":
        lastro = config.model.lastro
        parts.append("conv-ReLU-conv-ReLU-BN" if lastro.block_order == "paper" else "conv-BN-ReLU")
        if lastro.dropout_kind != "none" and lastro.dropout > 0:
            parts.append(f"{lastro.dropout_kind} dropout {lastro.dropout:g}")
        else:
            parts.append("no conv dropout")
        parts.append(f"dense dropout {lastro.dense_dropout:g}")
        parts.append(f"{lastro.init} init")
    else:
        parts.append(f"{config.model.resnet.init} init")
    parts.append(f"{config.optim.name} {config.optim.lr:g}")
    parts.append(f"batch {config.train.batch_size}")
    parts.append(config.train.augment)
    return ", ".join(parts)


def _run_history(checkpoint_url: str, fallback: list[dict[str, Any]]) -> list[dict[str, Any]]:
    run_url = checkpoint_url.rstrip("/").rsplit("/", 1)[0]
    try:
        return json.loads(storage.read_bytes(storage.join(run_url, HISTORY_FILE)))
    except FileNotFoundError:
        return fallback  # a checkpoint copied on its own: its history stops at its epoch


def _images_seen(history: list[dict[str, Any]]) -> int | None:
    """Training images drawn over the whole run (all epochs, all workers): the budget a recipe used.
    None for runs written before ``train_samples`` was recorded."""
    if not history or any("train_samples" not in row for row in history):
        return None
    return int(sum(row["train_samples"] for row in history))


@dataclass
class ComparisonTable:
    rows: list[dict[str, Any]]
    markdown_path: Path
    html_path: Path
    json_path: Path
    roc_path: Path

    def __str__(self) -> str:
        return markdown_table(self.rows) + f"\n\nwritten: {self.markdown_path}, {self.html_path}, {self.json_path}"


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]).replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(lines)


def compare_runs(
    runs: Sequence[str],
    out_dir: str | Path,
    *,
    split: str = "test",
    tta: str | None = None,
    names: Sequence[str] | None = None,
    store: str | None = None,
    device: str = "cpu",
) -> ComparisonTable:
    """Score every run on ``split`` of its own training store (or ``store``) and write the comparison."""
    from lensray import report
    from lensray.api import load_run
    from lensray.store import LensStore

    if not runs:
        raise EvaluateError("compare needs at least one run")
    if names is not None and len(names) != len(runs):
        raise EvaluateError(f"{len(names)} names for {len(runs)} runs")
    rows, curves = [], []
    for k, url in enumerate(runs):
        checkpoint = resolve_checkpoint(url)
        run = load_run(checkpoint, device=device)
        record = json.loads(storage.read_bytes(storage.join(checkpoint, MODEL_INPUT_FILE)))
        store_url = store or record.get("store")
        if not store_url:
            raise EvaluateError(f"{checkpoint}: no training store recorded; pass a store to evaluate on")
        lens_store = LensStore.open(store_url)
        predictions = predict_split(run, lens_store, split, tta)
        y, s = predictions.labels, predictions.scores
        history = _run_history(checkpoint, run.history)
        name = names[k] if names else checkpoint.rstrip("/").rsplit("/", 2)[-2]
        summary = metrics.summarise(y, s)
        rows.append({
            "name": name, "network": describe_network(run.config),
            "options": describe_options(run.config, (lens_store.meta.get("transform") or {}).get("mode")),
            "label_rule": lens_store.meta.get("label_rule", run.config.data.labels),
            "acc": summary["acc"], "auc": summary["auc"], "tpr0": summary["tpr0"], "tpr10": summary["tpr10"],
            "n": summary["n"], "n_pos": summary["n_pos"], "best_epoch": run.epoch, "epochs": len(history),
            "train_images": _images_seen(history),
            "train_s": float(sum(row.get("epoch_s", 0.0) for row in history)),
            "checkpoint": checkpoint, "store": store_url, "split": split, "tta": tta,
        })  # fmt: skip
        if 0 < summary["n_pos"] < summary["n"]:
            roc = metrics.roc(y, s)
            curves.append(report.Curve(f"{name} (AUC {summary['auc']:.3f})", roc.fpr, roc.tpr))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roc_png = report.roc_png(curves, title=f"ROC on each run's {split} split") if curves else b""
    roc_path = out / "compare_roc.png"
    roc_path.write_bytes(roc_png)
    markdown_path = out / "compare.md"
    markdown_path.write_text(markdown_table(rows) + "\n")
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(jsonable({"split": split, "tta": tta, "rows": rows}), indent=1, allow_nan=False))
    html_path = out / "compare.html"
    blocks: list[str | tuple[str, bytes]] = [
        f"<p>Each run scored on the <b>{split}</b> split of its own training store (its label rule); "
        f"ACC at threshold 0.5; TPR0 / TPR10: the highest TPR with 0 / fewer than 10 false positives; "
        f"train time: the sum of the epochs' wall times; test-time averaging: {tta or 'none'}.</p>",
        report.html_table(rows, COLUMNS, HEADERS),
        report.html_table(rows, ("name", "n", "n_pos", "checkpoint", "store"), ("run", "test objects", "lenses", "checkpoint", "store")),
    ]  # fmt: skip
    if roc_png:
        blocks.append(("ROC curves overlaid", roc_png))
    html_path.write_text(report.html_page("lensray comparison", blocks))
    return ComparisonTable(rows=rows, markdown_path=markdown_path, html_path=html_path, json_path=json_path, roc_path=roc_path)
