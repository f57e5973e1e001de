"""Compare trained runs side by side: a Table-I-style table (network, options, ACC, AUC, TPR0, TPR10,
epochs, training time) and their ROC curves overlaid, as Markdown, HTML and JSON.

Each run is scored on the test split of the store it was trained on (recorded in its checkpoint), so
runs trained under different label rules -- one store per rule -- are each judged by their own labels.
A run folder stands for its best checkpoint (highest ``val_auc``). An ensemble (``ensemble.EnsembleSpec``)
adds a row for itself and one per member, all from one pass over the store (each object read once for every
member), and the paired AUC difference between the ensemble and its best member on the test objects.
``compute_comparison`` returns a ``Comparison`` (rows, paired differences, ROC curves); ``write_comparison``
writes compare.md/.html/.json and the ROC plot; ``compare_runs`` does both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lensray import storage
from lensray.config import LensrayConfig
from lensray.errors import EvaluateError
from lensray.evaluate import metrics
from lensray.evaluate.ensemble import EnsembleSpec, load_ensemble
from lensray.evaluate.evaluate import jsonable, plain_fields
from lensray.evaluate.inference import SplitPredictions, predict_split
from lensray.models import describe_model, model_recipe
from lensray.runs import HISTORY_FILE, MODEL_INPUT_FILE, resolve_checkpoint
from lensray.runtime import progress

GAIN_COLUMNS = ("ensemble", "member", "auc_ensemble", "auc_member", "delta_auc", "low", "high", "p_not_better")
GAIN_COLUMNS += ("tpr10_ensemble", "tpr10_member", "n")
GAIN_HEADERS = ("ensemble", "best member", "AUC ens.", "AUC member", "AUC(ens.) - AUC(member)", "95% low")
GAIN_HEADERS += ("95% high", "P(ens. <= member)", "TPR10 ens.", "TPR10 member", "test objects")
PAIRED_COLUMNS = ("better", "worse", "delta_auc", "low", "high", "p_not_better", "n")
PAIRED_HEADERS = ("run A", "run B", "AUC(A) - AUC(B)", "95% low", "95% high", "P(A <= B)", "test objects")
COLUMNS = (
    "name",
    "network",
    "options",
    "label_rule",
    "acc",
    "auc",
    "tpr0",
    "tpr10",
    "best_epoch",
    "epochs",
    "train_images",
    "train_s",
)
HEADERS = (
    "run",
    "network",
    "options",
    "labels",
    "ACC",
    "AUC",
    "TPR0",
    "TPR10",
    "best epoch",
    "epochs",
    "images seen",
    "train time (s)",
)


def describe_options(config: LensrayConfig, mode: str | None) -> str:
    """The recipe in a few words: preprocessing, the network's own choices, optimiser, batch, augmentation."""
    parts = [mode or config.preprocess.mode, *model_recipe(config.model)]
    parts += [f"{config.optim.name} {config.optim.lr:g}", f"batch {config.train.batch_size}", config.train.augment]
    return ", ".join(parts)


def _run_history(checkpoint_url: str, fallback: list[dict[str, Any]]) -> list[dict[str, Any]]:
    run_url = checkpoint_url.rstrip("/").rsplit("/", 1)[0]
    try:
        return json.loads(storage.read_bytes(storage.join(run_url, HISTORY_FILE)))
    except FileNotFoundError:
        return fallback  # a checkpoint copied on its own: its history stops at its epoch


def _images_seen(history: list[dict[str, Any]]) -> int | None:
    """Training images drawn over the whole run (all epochs, all workers): the budget a recipe used."""
    return int(sum(row["train_samples"] for row in history)) if history else None


@dataclass(frozen=True)
class RunRow:
    """One run of the comparison: its recipe, its numbers on the split and its training budget."""

    name: str
    network: str
    options: str
    label_rule: str | None
    acc: float
    auc: float
    tpr0: float
    tpr10: float
    n: int
    n_pos: int
    best_epoch: int | None  # None for an ensemble
    epochs: int
    train_images: int | None
    train_s: float
    checkpoint: str
    store: str
    split: str
    tta: str | None

    def as_dict(self) -> dict[str, Any]:
        return plain_fields(self)


@dataclass(frozen=True)
class PairedDifference:
    """AUC(better) - AUC(worse) on the same objects, with its paired-bootstrap interval."""

    better: str
    worse: str
    delta_auc: float
    low: float
    high: float
    p_not_better: float
    n: int
    resamples: int

    def as_dict(self) -> dict[str, Any]:
        return plain_fields(self)


@dataclass(frozen=True)
class EnsembleGain:
    """AUC(ensemble) - AUC(its best member on these objects), signed, with the paired-bootstrap interval."""

    ensemble: str
    member: str
    auc_ensemble: float
    auc_member: float
    delta_auc: float
    low: float
    high: float
    p_not_better: float  # the fraction of resamples in which the ensemble does not beat the member
    tpr10_ensemble: float
    tpr10_member: float
    n: int
    resamples: int

    def as_dict(self) -> dict[str, Any]:
        return plain_fields(self)


def ensemble_gain(
    name: str, ensemble: SplitPredictions, members: Sequence[tuple[str, SplitPredictions]]
) -> EnsembleGain | None:
    """The ensemble against its best member by AUC on the same objects (the member most favoured by the very
    objects it is judged on, so the ensemble's gain is not flattered); None with one class only."""
    y = ensemble.labels
    if y.sum() in (0, y.size):
        return None
    best_name, best = max(members, key=lambda item: metrics.auc(y, item[1].scores))
    d = metrics.paired_auc_difference(y, ensemble.scores, best.scores)
    return EnsembleGain(
        ensemble=name,
        member=best_name,
        auc_ensemble=metrics.auc(y, ensemble.scores),
        auc_member=metrics.auc(y, best.scores),
        delta_auc=d.difference,
        low=d.low,
        high=d.high,
        p_not_better=d.p_not_better,
        tpr10_ensemble=metrics.tpr10(y, ensemble.scores),
        tpr10_member=metrics.tpr10(y, best.scores),
        n=int(y.size),
        resamples=d.resamples,
    )


@dataclass(frozen=True, eq=False)
class Comparison:
    """The runs' rows, their paired AUC differences and ROC curves (runs with both classes only)."""

    split: str
    tta: str | None
    rows: tuple[RunRow, ...]
    paired: tuple[PairedDifference, ...]
    rocs: tuple[tuple[str, metrics.RocCurve], ...]  # (legend label, curve)
    ensemble: EnsembleGain | None = None  # with an ensemble: it against its best member

    def as_dict(self) -> dict[str, Any]:
        """compare.json's content (before ``jsonable``)."""
        return {
            "split": self.split,
            "tta": self.tta,
            "rows": [row.as_dict() for row in self.rows],
            "paired": [pair.as_dict() for pair in self.paired],
            "ensemble": None if self.ensemble is None else self.ensemble.as_dict(),
        }


@dataclass(frozen=True)
class ComparisonTable:
    # URLs (local paths or s3://), as strings: the comparison may live in object storage.
    markdown_path: str
    html_path: str
    json_path: str
    roc_path: str
    html_blocks: list[str | tuple[str, bytes]]  # compare.html's content, to embed in another report
    comparison: Comparison

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [row.as_dict() for row in self.comparison.rows]

    @property
    def paired(self) -> list[dict[str, Any]]:
        """See ``paired_differences``."""
        return [pair.as_dict() for pair in self.comparison.paired]

    def __str__(self) -> str:
        text = markdown_table(self.rows)
        if self.comparison.ensemble is not None:
            gain = [self.comparison.ensemble.as_dict()]
            text += "\n\nensemble vs its best member:\n" + markdown_table(gain, GAIN_COLUMNS, GAIN_HEADERS)
        if self.paired:
            text += "\n\npaired AUC differences:\n" + markdown_table(self.paired, PAIRED_COLUMNS, PAIRED_HEADERS)
        return text + f"\n\nwritten: {self.markdown_path}, {self.html_path}, {self.json_path}"


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS, headers: Sequence[str] = HEADERS
) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)


def paired_differences(names: Sequence[str], predictions: Sequence[SplitPredictions]) -> tuple[PairedDifference, ...]:
    """For every two runs scored on the same objects with the same labels (the same store split, or
    stores of one catalogue under one label rule): AUC difference with a paired-bootstrap 95 % interval,
    the better run first. Runs on different objects are not paired: their AUCs are not comparable so."""
    keyed = []
    for name, p in zip(names, predictions, strict=False):
        order = np.argsort(p.ids, kind="stable")
        keyed.append((name, p.ids[order], p.labels[order], p.scores[order]))
    pairs = []
    for i, (name_a, ids_a, y_a, s_a) in enumerate(keyed):
        for name_b, ids_b, y_b, s_b in keyed[i + 1 :]:
            if not (np.array_equal(ids_a, ids_b) and np.array_equal(y_a, y_b)):
                continue
            better, worse = (name_a, s_a), (name_b, s_b)
            if metrics.auc(y_a, s_a) < metrics.auc(y_a, s_b):  # orient: the better run first
                better, worse = worse, better
            d = metrics.paired_auc_difference(y_a, better[1], worse[1])
            if not math.isnan(d.difference):
                pairs.append(
                    PairedDifference(
                        better[0], worse[0], d.difference, d.low, d.high, d.p_not_better, len(y_a), d.resamples
                    )
                )
    return tuple(pairs)


# --- computing ------------------------------------------------------------------------------------


def _score_run(
    url: str, name: str | None, split: str, tta: str | None, store: str | None, device: str
) -> tuple[RunRow, SplitPredictions]:
    """One run scored on ``split`` of its own training store (or ``store``), and its table row."""
    from lensray.ingest.store import LensStore
    from lensray.runs import load_run

    checkpoint = resolve_checkpoint(url)
    run = load_run(checkpoint, device=device)
    record = json.loads(storage.read_bytes(storage.join(checkpoint, MODEL_INPUT_FILE)))
    store_url = store or record.get("store")
    if not store_url:
        raise EvaluateError(f"{checkpoint}: no training store recorded; pass a store to evaluate on")
    lens_store = LensStore.open(store_url)
    predictions = predict_split(run, lens_store, split, tta)
    name = checkpoint.rstrip("/").rsplit("/", 2)[-2] if name is None else name
    return _run_row(name, run, lens_store, predictions, split, tta), predictions


def _run_row(
    name: str, run: Any, lens_store: Any, predictions: SplitPredictions, split: str, tta: str | None
) -> RunRow:
    """A loaded run's row from its predictions on ``lens_store``'s split."""
    y, s = predictions.labels, predictions.scores
    checkpoint = run.checkpoint_url
    history = _run_history(checkpoint, run.history)
    return RunRow(
        name=name,
        network=describe_model(run.config.model),
        options=describe_options(run.config, (lens_store.meta.get("transform") or {}).get("mode")),
        label_rule=lens_store.meta.get("label_rule", run.config.data.labels),
        acc=metrics.acc(y, s),
        auc=metrics.auc(y, s),
        tpr0=metrics.tpr0(y, s),
        tpr10=metrics.tpr10(y, s),
        n=int(y.size),
        n_pos=int(np.count_nonzero(y)),
        best_epoch=run.epoch,
        epochs=len(history),
        train_images=_images_seen(history),
        train_s=float(sum(epoch.get("epoch_s", 0.0) for epoch in history)),
        checkpoint=checkpoint,
        store=lens_store.url,
        split=split,
        tta=tta,
    )


def _score_ensemble(
    spec: EnsembleSpec, name: str, split: str, tta: str | None, store: str | None, device: str
) -> tuple[list[tuple[RunRow, SplitPredictions]], EnsembleGain | None]:
    """The ensemble's row first, then one per member, from one pass over the split; and its gain."""
    from lensray.ingest.store import LensStore

    store_url = store or spec.store
    if not store_url:
        raise EvaluateError(f"the members of the {spec.label} were trained on different stores; pass a store")
    model = load_ensemble(spec, device)
    lens_store = LensStore.open(store_url)
    predictions = predict_split(model, lens_store, split, tta)
    scored = []
    for k, (member, run) in enumerate(zip(spec.members, model.runs, strict=True)):
        own = replace(predictions, scores=predictions.members[:, k], per_transform=None, members=None)
        scored.append((_run_row(member.name, run, lens_store, own, split, tta), own))
    y, s = predictions.labels, predictions.scores
    rows = [row for row, _ in scored]
    networks = sorted({row.network for row in rows})
    budget = [row.train_images for row in rows]
    ensemble_row = RunRow(
        name=name,
        network=f"ensemble of {len(rows)}: {', '.join(networks)}",
        options=f"mean probability of {', '.join(row.name for row in rows)}",
        label_rule=rows[0].label_rule,
        acc=metrics.acc(y, s),
        auc=metrics.auc(y, s),
        tpr0=metrics.tpr0(y, s),
        tpr10=metrics.tpr10(y, s),
        n=int(y.size),
        n_pos=int(np.count_nonzero(y)),
        best_epoch=None,
        epochs=sum(row.epochs for row in rows),
        train_images=None if None in budget else sum(budget),
        train_s=sum(row.train_s for row in rows),
        checkpoint=", ".join(spec.checkpoints),
        store=store_url,
        split=split,
        tta=tta,
    )
    gain = ensemble_gain(name, predictions, [(row.name, p) for row, p in scored])
    return [(ensemble_row, predictions), *scored], gain


def compute_comparison(
    runs: Sequence[str],
    *,
    split: str = "test",
    tta: str | None = None,
    names: Sequence[str] | None = None,
    store: str | None = None,
    device: str = "cpu",
    ensemble: EnsembleSpec | None = None,
    ensemble_name: str = "ensemble",
) -> Comparison:
    """Score every run on ``split`` of its own training store (or ``store``): rows, pairs, ROC curves.
    With ``ensemble``: its row (``ensemble_name``) and its members' rows after the runs', and ``ensemble``
    (the ensemble against its best member)."""
    if not runs and ensemble is None:
        raise EvaluateError("compare needs at least one run")
    if names is not None and len(names) != len(runs):
        raise EvaluateError(f"{len(names)} names for {len(runs)} runs")
    results: list[tuple[RunRow, SplitPredictions]] = []
    gain = None
    with progress(len(runs) + (ensemble is not None), "compare", "run") as bar:
        for k, url in enumerate(runs):
            results.append(_score_run(url, names[k] if names else None, split, tta, store, device))
            bar.update()
        if ensemble is not None:
            scored, gain = _score_ensemble(ensemble, ensemble_name, split, tta, store, device)
            results += scored
            bar.update()
    rows = [row for row, _ in results]
    rocs = [
        (f"{row.name} (AUC {row.auc:.3f})", metrics.roc(p.labels, p.scores))
        for row, p in results
        if 0 < row.n_pos < row.n
    ]
    paired = paired_differences([row.name for row in rows], [p for _, p in results])
    return Comparison(split=split, tta=tta, rows=tuple(rows), paired=paired, rocs=tuple(rocs), ensemble=gain)


# --- writing --------------------------------------------------------------------------------------


def compare_runs(
    runs: Sequence[str],
    out_dir: str | Path,
    *,
    split: str = "test",
    tta: str | None = None,
    names: Sequence[str] | None = None,
    store: str | None = None,
    device: str = "cpu",
    ensemble: EnsembleSpec | None = None,
) -> ComparisonTable:
    """Score every run (and ``ensemble`` with its members) on ``split`` of its own training store (or
    ``store``) and write the comparison into ``out_dir``: a local folder or an s3:// prefix (files rendered
    in memory, written through ``storage``)."""
    comparison = compute_comparison(
        runs, split=split, tta=tta, names=names, store=store, device=device, ensemble=ensemble
    )
    return write_comparison(comparison, out_dir)


def comparison_markdown(comparison: Comparison) -> str:
    rows = [row.as_dict() for row in comparison.rows]
    markdown = markdown_table(rows) + "\n"
    if comparison.ensemble is not None:
        markdown += "\nThe ensemble against its best member (same test objects, paired bootstrap):\n\n"
        markdown += markdown_table([comparison.ensemble.as_dict()], GAIN_COLUMNS, GAIN_HEADERS) + "\n"
    if comparison.paired:
        paired = [pair.as_dict() for pair in comparison.paired]
        markdown += "\nPaired AUC differences (same test objects, 2,000 bootstrap resamples):\n\n"
        markdown += markdown_table(paired, PAIRED_COLUMNS, PAIRED_HEADERS) + "\n"
    return markdown


def comparison_blocks(comparison: Comparison, roc_png: bytes) -> list[str | tuple[str, bytes]]:
    """compare.html's content: the table, the runs' objects and stores, the paired differences, the ROC."""
    from lensray.evaluate.report import html_table

    rows = [row.as_dict() for row in comparison.rows]
    blocks: list[str | tuple[str, bytes]] = [
        "<h2>Runs compared (Table I of the study, for these runs)</h2>",
        f"<p>Each run scored on the <b>{comparison.split}</b> split of its own training store (its label rule); "
        f"ACC at threshold 0.5; TPR0 / TPR10: the highest TPR with 0 / fewer than 10 false positives; "
        f"images seen: training images drawn over all epochs (the run's budget); train time: the sum of the "
        f"epochs' wall times; test-time averaging: {comparison.tta or 'none'}.</p>",
        html_table(rows, COLUMNS, HEADERS),
        html_table(
            rows,
            ("name", "n", "n_pos", "checkpoint", "store"),
            ("run", "test objects", "lenses", "checkpoint", "store"),
        ),
    ]
    if comparison.ensemble is not None:
        blocks += [
            "<p>The ensemble (the mean of its members' probabilities) against its best member on the same "
            "objects (the member with the highest AUC on them); the interval is the paired bootstrap's 95 %.</p>",
            html_table([comparison.ensemble.as_dict()], GAIN_COLUMNS, GAIN_HEADERS),
        ]
    if comparison.paired:
        blocks += [
            "<p>Paired AUC differences: runs scored on the same test objects with the same labels, "
            "objects resampled together (2,000 bootstrap draws); P(A &le; B) is the fraction of draws in "
            "which A does not beat B.</p>",
            html_table([pair.as_dict() for pair in comparison.paired], PAIRED_COLUMNS, PAIRED_HEADERS),
        ]
    if roc_png:
        blocks.append(("ROC curves overlaid", roc_png))
    return blocks


def write_comparison(comparison: Comparison, out_dir: str | Path) -> ComparisonTable:
    """Write compare_roc.png, compare.md, compare.json and compare.html into ``out_dir``."""
    from lensray.evaluate import report

    out = str(out_dir).rstrip("/")
    curves = [report.Curve(label, roc.fpr, roc.tpr) for label, roc in comparison.rocs]
    roc_png = report.roc_png(curves, title=f"ROC on each run's {comparison.split} split") if curves else b""
    roc_path = storage.join(out, "compare_roc.png")
    storage.write_bytes(roc_path, roc_png)
    markdown_path = storage.join(out, "compare.md")
    storage.write_bytes(markdown_path, comparison_markdown(comparison).encode())
    json_path = storage.join(out, "compare.json")
    storage.write_bytes(json_path, json.dumps(jsonable(comparison.as_dict()), indent=1, allow_nan=False).encode())
    html_path = storage.join(out, "compare.html")
    blocks = comparison_blocks(comparison, roc_png)
    storage.write_bytes(html_path, report.html_page("lensray comparison", blocks).encode())
    return ComparisonTable(
        markdown_path=markdown_path,
        html_path=html_path,
        json_path=json_path,
        roc_path=roc_path,
        html_blocks=blocks,
        comparison=comparison,
    )
