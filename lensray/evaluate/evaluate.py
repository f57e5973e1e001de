"""Evaluate a trained run on a store's split: every number, the plots and one self-contained HTML report.

``evaluate_run`` predicts the split in batches from the store (optionally averaging the 8 D4 views),
then computes ACC at 0.5 and at the threshold chosen on the run's validation predictions, ROC / AUC,
TPR0 / TPR10 (``metrics``), precision-recall, a reliability curve, and what a survey would see: at a
realistic lens prevalence (default 1 in 10^4, where the test set is roughly balanced), the expected
true and false candidates per 10^4 cutouts and their precision, from the measured TPR and FPR. An FPR
of 0 on the test set is not 0 in a survey: it is reported with its 95 % upper bound 3 / n_neg (the rule
of three), and the precision with the matching lower bound. Galleries show the highest-scored
non-lenses and the lowest-scored lenses as the network saw them.

Computing and writing are apart: ``compute_evaluation`` returns an ``Evaluation`` (typed numbers and
the galleries' images), ``write_evaluation`` renders it into metrics.json, predictions.csv, the PNGs
and report.html. ``evaluate_run`` does both.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lensray import storage
from lensray.errors import EvaluateError
from lensray.evaluate import metrics
from lensray.evaluate.ensemble import EnsembleSpec, load_model
from lensray.evaluate.inference import PREDICT_BATCH, SplitPredictions, check_tta, predict_rows, predict_split
from lensray.runs import MODEL_INPUT_FILE, resolve_checkpoint

DEFAULT_PREVALENCE = 1e-4  # lenses per cutout in a survey (order of magnitude for Euclid)
PER_CUTOUTS = 10_000  # survey numbers are per this many cutouts
DEFAULT_THRESHOLD = 0.5
SURVEY_THRESHOLDS = (0.5, 0.9, 0.99, 0.999)  # plus the validation-chosen one
CALIBRATION_BINS = 10
GALLERY_SIZE = 8
RULE_OF_THREE = 3.0  # 95 % upper bound on a rate with 0 events in n trials: 3 / n
REPORT_HTML, REPORT_JSON, PREDICTIONS_CSV = "report.html", "metrics.json", "predictions.csv"


def plain_fields(value: Any) -> dict[str, Any]:
    """A dataclass's fields in declaration order, one level deep (no deep copy of arrays)."""
    return {f.name: getattr(value, f.name) for f in fields(value)}


def jsonable(value: Any) -> Any:
    """Plain JSON data: numpy to Python, NaN and infinities to None (strict JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# --- numbers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """Counts of true/false positives/negatives at one threshold."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n_pos(self) -> int:
        return self.tp + self.fn

    @property
    def n_neg(self) -> int:
        return self.fp + self.tn

    def as_dict(self) -> dict[str, int]:
        return plain_fields(self)


def confusion(labels: ArrayLike, scores: ArrayLike, threshold: float) -> Confusion:
    """Counts of true/false positives/negatives when a lens is ``score >= threshold``."""
    y, s = np.asarray(labels) == 1, np.asarray(scores, dtype=np.float64) >= threshold
    return Confusion(tp=int(np.sum(y & s)), fp=int(np.sum(~y & s)), tn=int(np.sum(~y & ~s)), fn=int(np.sum(y & ~s)))


@dataclass(frozen=True)
class SurveyRow:
    """What a survey would get at one threshold (see ``survey_row``)."""

    threshold: float
    counts: Confusion
    tpr: float
    fpr: float
    fpr_is_upper_bound: bool
    fpr_bound: float
    expected_true: float
    expected_false: float
    expected_false_bound: float
    precision: float | None
    precision_bound: float | None
    prevalence: float
    per: int
    name: str | None = None  # the report's label: the threshold, or "validation-chosen"

    def as_dict(self) -> dict[str, Any]:
        """metrics.json's row: the counts inline after the threshold, the name (when given) last."""
        row: dict[str, Any] = {"threshold": self.threshold, **self.counts.as_dict()}
        row.update({k: v for k, v in plain_fields(self).items() if k not in ("threshold", "counts", "name")})
        if self.name is not None:
            row["name"] = self.name
        return row


def _precision(true: float, false: float) -> float | None:
    return true / (true + false) if true + false > 0 else None


def _check_prevalence(prevalence: float) -> None:
    if not 0 < prevalence < 1:
        raise EvaluateError(f"prevalence must be in (0, 1), got {prevalence}")


def survey_row(
    labels: ArrayLike,
    scores: ArrayLike,
    threshold: float,
    prevalence: float = DEFAULT_PREVALENCE,
    per: int = PER_CUTOUTS,
) -> SurveyRow:
    """What a survey of ``per`` cutouts with lens fraction ``prevalence`` would get at ``threshold``.

    expected true = prevalence x TPR x per; expected false = (1 - prevalence) x FPR x per;
    precision = true / (true + false). With no false positive among the n_neg test non-lenses the
    measured FPR of 0 only says FPR < 3 / n_neg (95 %, the rule of three), so the false count and the
    precision are also given at that bound (``*_bound``; with FP > 0 the bound columns repeat the
    measured values). Precision is None when nothing would be selected.
    """
    _check_prevalence(prevalence)
    counts = confusion(labels, scores, threshold)
    if counts.n_pos == 0 or counts.n_neg == 0:
        raise EvaluateError(f"survey numbers need lenses and non-lenses; got {counts.n_pos} and {counts.n_neg}")
    tpr, fpr = counts.tp / counts.n_pos, counts.fp / counts.n_neg
    fpr_bound = RULE_OF_THREE / counts.n_neg if counts.fp == 0 else fpr
    expected_true = prevalence * tpr * per
    expected_false = (1 - prevalence) * fpr * per
    expected_false_bound = (1 - prevalence) * fpr_bound * per
    return SurveyRow(
        threshold=float(threshold),
        counts=counts,
        tpr=tpr,
        fpr=fpr,
        fpr_is_upper_bound=counts.fp == 0,
        fpr_bound=fpr_bound,
        expected_true=expected_true,
        expected_false=expected_false,
        expected_false_bound=expected_false_bound,
        precision=_precision(expected_true, expected_false),
        precision_bound=_precision(expected_true, expected_false_bound),
        prevalence=prevalence,
        per=per,
    )


@dataclass(frozen=True)
class Survey:
    """Survey rows at every threshold asked for, at one prevalence."""

    prevalence: float
    per: int
    rule: str
    rows: tuple[SurveyRow, ...]

    def at(self, threshold: float) -> SurveyRow:
        return next(row for row in self.rows if row.threshold == threshold)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prevalence": self.prevalence,
            "per": self.per,
            "rule": self.rule,
            "rows": [r.as_dict() for r in self.rows],
        }


def survey_table(
    labels: ArrayLike, scores: ArrayLike, thresholds: Sequence[float], chosen: float, prevalence: float
) -> Survey:
    """``survey_row`` at each of ``thresholds`` and the validation-chosen threshold, in increasing order."""
    rows = tuple(
        replace(survey_row(labels, scores, t, prevalence), name=_level_name(t, chosen))
        for t in sorted({*thresholds, chosen})
    )
    return Survey(prevalence, PER_CUTOUTS, "FPR < 3/n_neg (95%) when no FP", rows)


def _level_name(threshold: float, chosen: float) -> str:
    return "validation-chosen" if threshold == chosen else f"{threshold:g}"


@dataclass(frozen=True, eq=False)
class Calibration:
    """Reliability curve (NaN in empty bins), objects per bin, expected calibration error, Brier score."""

    edges: np.ndarray
    counts: np.ndarray
    mean_predicted: np.ndarray
    fraction_positive: np.ndarray
    ece: float
    brier: float


def calibration(labels: ArrayLike, scores: ArrayLike, n_bins: int = CALIBRATION_BINS) -> Calibration:
    """Reliability curve over ``n_bins`` equal-width probability bins (scikit-learn's binning), the
    count per bin, the expected calibration error and the Brier score. Scores must be probabilities."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if s.min() < 0 or s.max() > 1:
        raise EvaluateError(f"calibration needs probabilities in [0, 1]; scores span {s.min()}..{s.max()}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.searchsorted(edges[1:-1], s)  # the same assignment as sklearn's calibration_curve
    counts = np.bincount(bin_of, minlength=n_bins)
    fraction, mean = calibration_curve(y, s, n_bins=n_bins, strategy="uniform")
    fraction_full = np.full(n_bins, np.nan)
    mean_full = np.full(n_bins, np.nan)
    fraction_full[counts > 0], mean_full[counts > 0] = fraction, mean
    filled = counts > 0
    ece = float(np.sum(counts[filled] / y.size * np.abs(fraction_full[filled] - mean_full[filled])))
    return Calibration(edges, counts, mean_full, fraction_full, ece, float(brier_score_loss(y, s)))


@dataclass(frozen=True, eq=False)
class PrecisionRecall:
    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    average_precision: float


def precision_recall(labels: ArrayLike, scores: ArrayLike) -> PrecisionRecall:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    return PrecisionRecall(precision, recall, thresholds, float(average_precision_score(labels, scores)))


@dataclass(frozen=True)
class Thresholds:
    """The fixed threshold and the one chosen on the validation set (field names are metrics.json's keys)."""

    default: float
    validation: float
    validation_criterion: str
    validation_source: str


@dataclass(frozen=True)
class Headline:
    """The headline metrics of the evaluated split."""

    auc: float
    tpr0: float
    tpr10: float
    acc_at_default: float
    acc_at_validation: float
    confusion_at_default: Confusion
    confusion_at_validation: Confusion
    average_precision: float
    brier: float
    ece: float

    def as_dict(self) -> dict[str, Any]:
        at = f"{DEFAULT_THRESHOLD:g}"
        return {
            "auc": self.auc,
            "tpr0": self.tpr0,
            "tpr10": self.tpr10,
            f"acc_at_{at}": self.acc_at_default,
            "acc_at_validation": self.acc_at_validation,
            f"confusion_at_{at}": self.confusion_at_default.as_dict(),
            "confusion_at_validation": self.confusion_at_validation.as_dict(),
            "average_precision": self.average_precision,
            "brier": self.brier,
            "ece": self.ece,
        }


def headline_metrics(
    y: np.ndarray, s: np.ndarray, chosen: float, pr: PrecisionRecall, reliability: Calibration
) -> Headline:
    return Headline(
        auc=metrics.auc(y, s),
        tpr0=metrics.tpr0(y, s),
        tpr10=metrics.tpr10(y, s),
        acc_at_default=metrics.acc(y, s, DEFAULT_THRESHOLD),
        acc_at_validation=metrics.acc(y, s, chosen),
        confusion_at_default=confusion(y, s, DEFAULT_THRESHOLD),
        confusion_at_validation=confusion(y, s, chosen),
        average_precision=pr.average_precision,
        brier=reliability.brier,
        ece=reliability.ece,
    )


@dataclass(frozen=True)
class Timing:
    predict_s: float
    images_per_s: float  # network passes: 8 per object with D4 averaging


# --- galleries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GalleryKind:
    name: str  # file stem and metrics.json key
    label: int  # the true class shown
    order: int  # -1: highest scores first, 1: lowest first
    title: str
    wrong: str  # what a member past the threshold is
    mark: str  # its caption mark

    def is_wrong(self, score: float, threshold: float) -> bool:
        return (score >= threshold) == (self.label == 0)


FALSE_POSITIVES = GalleryKind("false_positives", 0, -1, "Highest-scored non-lenses", "false positives", "FP")
FALSE_NEGATIVES = GalleryKind("false_negatives", 1, 1, "Lowest-scored lenses", "false negatives", "FN")


@dataclass(frozen=True)
class GalleryItem:
    id: int
    score: float
    row: int  # store row


@dataclass(frozen=True, eq=False)
class Gallery:
    kind: GalleryKind
    items: tuple[GalleryItem, ...]
    images: np.ndarray | None  # (N, C, H, W) network inputs; None when empty


def pick_galleries(store: Any, p: SplitPredictions, size: int) -> tuple[Gallery, ...]:
    """The ``size`` highest-scored non-lenses and lowest-scored lenses, with their images."""
    out = []
    for kind in (FALSE_POSITIVES, FALSE_NEGATIVES):
        members = np.flatnonzero(p.labels == kind.label)
        ranked = members[np.argsort(kind.order * p.scores[members], kind="stable")][:size]
        items = tuple(GalleryItem(int(p.ids[k]), float(p.scores[k]), int(p.rows[k])) for k in ranked)
        rows = np.array([item.row for item in items], dtype=np.int64)
        out.append(Gallery(kind, items, store.read(rows).astype(np.float32) if items else None))
    return tuple(out)


# --- the evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Every number of one evaluation, the predictions behind them and the galleries' images."""

    checkpoint: str
    store: str
    split: str
    tta: str | None
    device: str
    epoch: int | None  # None for an ensemble (its members' epochs are in ``members``)
    model: str
    label_rule: str | None
    bands: list[str] | None  # as the store records them
    transform: dict[str, Any] | None
    predictions: SplitPredictions
    thresholds: Thresholds
    headline: Headline
    roc: metrics.RocCurve
    precision_recall: PrecisionRecall
    calibration: Calibration
    survey: Survey
    timing: Timing
    run_metrics: dict[str, Any]
    trained_balanced: bool
    galleries: tuple[Gallery, ...]
    display_bands: tuple[str, ...]  # the bands' names, or "band k" when the store has none
    members: tuple[dict[str, Any], ...] = ()  # an ensemble's members: name, checkpoint, epoch, their own AUC

    @property
    def n(self) -> int:
        return int(self.predictions.labels.size)

    @property
    def n_pos(self) -> int:
        return int(self.predictions.labels.sum())

    @property
    def n_neg(self) -> int:
        return self.n - self.n_pos

    def as_dict(self) -> dict[str, Any]:
        """metrics.json's content (before ``jsonable``)."""
        head = {k: getattr(self, k) for k in ("checkpoint", "store", "split", "tta", "device", "epoch", "model")}
        head |= {"label_rule": self.label_rule, "bands": self.bands, "transform": self.transform}
        return (
            head
            | {
                "n": self.n,
                "n_pos": self.n_pos,
                "n_neg": self.n_neg,
                "thresholds": plain_fields(self.thresholds),
                "metrics": self.headline.as_dict(),
                "roc": self.roc._asdict(),
                "precision_recall": plain_fields(self.precision_recall),
                "calibration": plain_fields(self.calibration),
                "survey": self.survey.as_dict(),
                "timing": plain_fields(self.timing),
                "run_metrics": self.run_metrics,
                "trained_balanced": self.trained_balanced,
                "gallery": {g.kind.name: [{"id": i.id, "score": i.score} for i in g.items] for g in self.galleries},
            }
            | (
                {"members": list(self.members), "mean_score_std": float(self.predictions.spread.mean())}
                if self.members
                else {}
            )
        )


def _check_geometry(checkpoint_url: str, store: Any) -> None:
    record = json.loads(storage.read_bytes(storage.join(checkpoint_url, MODEL_INPUT_FILE)))
    c, h, w = store.sample_shape
    if (c, h, w) != (record["channels"], record["size"], record["size"]):
        raise EvaluateError(
            f"{store.url} holds {c}x{h}x{w} images; the network of {checkpoint_url} takes "
            f"{record['channels']}x{record['size']}x{record['size']} (bands {record.get('bands')})"
        )
    if record.get("transform") and store.meta.get("transform") and record["transform"] != store.meta["transform"]:
        raise EvaluateError(
            f"{store.url} was preprocessed differently from the network's training store {record.get('store')}: "
            f"{store.meta['transform']} vs {record['transform']}"
        )


def validation_threshold(run: Any, store: Any, tta: str | None, batch_size: int = PREDICT_BATCH) -> tuple[float, str]:
    """The ACC-maximising threshold on the run's validation set, scored like the evaluated split."""
    stored = run.val_predictions()
    labels, scores = stored["labels"], stored["scores"]
    source = "the checkpoint's stored validation predictions"
    if tta:
        position = {int(i): k for k, i in enumerate(store.ids)}
        rows = [position.get(int(i)) for i in stored["ids"]]
        if all(r is not None and store.valid[r] for r in rows):
            scores = predict_rows(
                run, store, np.asarray(rows, np.int64), tta, batch_size, f"re-score val ({tta})"
            ).scores
            source = f"the validation set re-scored with {tta} test-time averaging"
        else:
            source += f" (without {tta}: the validation IDs are not in {store.url})"
    return metrics.choose_threshold(labels, scores, "acc"), source


def _members(model: Any, predictions: SplitPredictions) -> tuple[dict[str, Any], ...]:
    """An ensemble's members as metrics.json lists them, each with its own AUC on the evaluated objects."""
    if predictions.members is None:
        return ()
    return tuple(
        {"name": m.name, "checkpoint": m.checkpoint, "epoch": run.epoch, "model": run.config.model.name, "auc": auc}
        for m, run, auc in zip(
            model.members,
            model.runs,
            (metrics.auc(predictions.labels, column) for column in predictions.members.T),
            strict=True,
        )
    )


def compute_evaluation(
    checkpoint_url: str | EnsembleSpec,
    store_url: str,
    split: str = "test",
    tta: str | None = None,
    *,
    device: str = "cpu",
    prevalence: float = DEFAULT_PREVALENCE,
    thresholds: tuple[float, ...] = SURVEY_THRESHOLDS,
    gallery: int = GALLERY_SIZE,
    batch_size: int = PREDICT_BATCH,
) -> Evaluation:
    """Every number of ``evaluate_run`` (see there), without writing anything. ``checkpoint_url``: a
    checkpoint, a run folder, or an ensemble (``ensemble.EnsembleSpec``: the members' mean, with their spread)."""
    from lensray.ingest.store import LensStore

    tta = check_tta(tta)
    _check_prevalence(prevalence)
    ensemble = checkpoint_url if isinstance(checkpoint_url, EnsembleSpec) else None
    checkpoint_url = ensemble.label if ensemble else resolve_checkpoint(checkpoint_url)
    run = load_model(ensemble or checkpoint_url, device=device)
    store = LensStore.open(store_url)
    for checkpoint in ensemble.checkpoints if ensemble else (checkpoint_url,):
        _check_geometry(checkpoint, store)
    predictions = predict_split(run, store, split, tta, batch_size)
    y, s = predictions.labels, predictions.scores
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise EvaluateError(
            f"{store_url}: the {split} split has {n_pos} lenses of {y.size}; ROC and AUC need both classes"
        )
    chosen, chosen_source = validation_threshold(run, store, tta, batch_size)
    pr, reliability = precision_recall(y, s), calibration(y, s)
    bands = store.meta.get("bands")
    return Evaluation(
        checkpoint=checkpoint_url,
        store=store_url,
        split=split,
        tta=tta,
        device=device,
        epoch=None if ensemble else run.epoch,
        model=f"ensemble of {len(ensemble.members)}" if ensemble else run.config.model.name,
        label_rule=store.meta.get("label_rule"),
        bands=bands,
        transform=store.meta.get("transform"),
        predictions=predictions,
        thresholds=Thresholds(DEFAULT_THRESHOLD, chosen, "acc", chosen_source),
        headline=headline_metrics(y, s, chosen, pr, reliability),
        roc=metrics.roc(y, s),
        precision_recall=pr,
        calibration=reliability,
        survey=survey_table(y, s, thresholds, chosen, prevalence),
        timing=Timing(predictions.seconds, y.size * (8 if tta else 1) / max(predictions.seconds, 1e-9)),
        run_metrics={} if ensemble else run.metrics,
        trained_balanced=all(r.config.train.balanced for r in (run.runs if ensemble else [run])),
        galleries=pick_galleries(store, predictions, gallery),
        display_bands=tuple(bands or (f"band {k}" for k in range(store.sample_shape[0]))),
        members=_members(run, predictions),
    )


# --- the report files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationReport:
    # URLs (local paths or s3://), as strings: the report may live in object storage.
    out_dir: str
    html_path: str
    json_path: str
    predictions_path: str
    evaluation: Evaluation

    @property
    def numbers(self) -> dict[str, Any]:
        """The content of metrics.json."""
        return jsonable(self.evaluation.as_dict())

    def __str__(self) -> str:
        ev = self.evaluation
        m, t = ev.headline, ev.thresholds
        row = ev.survey.at(t.validation)

        def f(value: Any, digits: int = 3) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        bound = " (upper bound: no FP on test)" if row.fpr_is_upper_bound else ""
        lines = [
            f"evaluation of {ev.checkpoint} on {ev.store} [{ev.split}, {ev.n} objects, {ev.n_pos} lenses, "
            f"TTA {ev.tta or 'none'}]",
            f"  AUC {f(m.auc)}  ACC@{t.default:g} {f(m.acc_at_default)}  ACC@{t.validation:.3f} (val-chosen) "
            f"{f(m.acc_at_validation)}  TPR0 {f(m.tpr0)}  TPR10 {f(m.tpr10)}  AP {f(m.average_precision)}",
            f"  survey at prevalence {ev.survey.prevalence:g}, per {ev.survey.per} cutouts, threshold "
            f"{t.validation:.3f}: {row.expected_true:.2f} lenses, {f(row.expected_false_bound, 1)} "
            f"false{bound}, precision {f(row.precision_bound)}",
            f"  report: {self.html_path}",
            f"  numbers: {self.json_path}",
        ]
        return "\n".join(lines)


def evaluate_run(
    checkpoint_url: str | EnsembleSpec,
    store_url: str,
    out_dir: str | Path,
    split: str = "test",
    tta: str | None = None,
    *,
    device: str = "cpu",
    prevalence: float = DEFAULT_PREVALENCE,
    thresholds: tuple[float, ...] = SURVEY_THRESHOLDS,
    gallery: int = GALLERY_SIZE,
    batch_size: int = PREDICT_BATCH,
    appendix: Sequence[str | tuple[str, bytes]] = (),
) -> EvaluationReport:
    """Evaluate ``checkpoint_url`` (a checkpoint, a run folder: its best, or an ``EnsembleSpec``) on ``split``
    of ``store_url``;
    write ``report.html``, ``metrics.json``, ``predictions.csv`` and the PNGs into ``out_dir`` (a local
    folder or an s3:// prefix: every file is rendered in memory and written through ``storage``).
    ``appendix``: more report blocks (HTML, or (caption, PNG) pairs) placed after the galleries, e.g. a
    comparison with other runs (``compare.ComparisonTable.html_blocks``)."""
    evaluation = compute_evaluation(
        checkpoint_url,
        store_url,
        split,
        tta,
        device=device,
        prevalence=prevalence,
        thresholds=thresholds,
        gallery=gallery,
        batch_size=batch_size,
    )
    return write_evaluation(evaluation, out_dir, appendix)


def write_evaluation(
    evaluation: Evaluation, out_dir: str | Path, appendix: Sequence[str | tuple[str, bytes]] = ()
) -> EvaluationReport:
    """Write the PNGs, ``metrics.json``, ``predictions.csv`` and, last, ``report.html`` into ``out_dir``."""
    out = str(out_dir).rstrip("/")
    figures = evaluation_figures(evaluation)
    for name, png in figures.items():
        storage.write_bytes(storage.join(out, f"{name}.png"), png)
    json_path = storage.join(out, REPORT_JSON)
    storage.write_bytes(json_path, json.dumps(jsonable(evaluation.as_dict()), indent=1, allow_nan=False).encode())
    predictions_path = storage.join(out, PREDICTIONS_CSV)
    storage.write_bytes(predictions_path, predictions_csv(evaluation.predictions).encode())
    html_path = storage.join(out, REPORT_HTML)  # last: its presence says the report is complete
    storage.write_bytes(html_path, report_html(evaluation, figures, appendix).encode())
    return EvaluationReport(
        out_dir=out, html_path=html_path, json_path=json_path, predictions_path=predictions_path, evaluation=evaluation
    )


def evaluation_figures(ev: Evaluation) -> dict[str, bytes]:
    """PNGs by file stem: roc, precision_recall, calibration and the non-empty galleries."""
    from lensray.evaluate import report

    label = f"{ev.model} (AUC {ev.headline.auc:.3f})"
    pr, cal = ev.precision_recall, ev.calibration
    figures = {
        "roc": report.roc_png(
            [report.Curve(label, ev.roc.fpr, ev.roc.tpr)], title=f"ROC, {ev.split} split", min_fpr=1.0 / ev.n_neg
        ),
        "precision_recall": report.pr_png([report.Curve(label, pr.recall, pr.precision)], prevalence=ev.n_pos / ev.n),
        "calibration": report.calibration_png(cal.mean_predicted, cal.fraction_positive, cal.counts, cal.edges),
    }
    shown = [g for g in ev.galleries if g.images is not None]
    if shown:
        limits = report.display_limits(np.concatenate([g.images for g in shown]))  # one scale for both galleries
        bands = list(ev.display_bands)
        for g in shown:
            t = ev.thresholds.validation
            captions = [
                f"ID {i.id}\n{i.score:.4f}{' ' + g.kind.mark if g.kind.is_wrong(i.score, t) else ''}" for i in g.items
            ]
            per_row = max(1, 12 // len(bands))
            figures[g.kind.name] = report.gallery_png(g.images, captions, bands, per_row=per_row, limits=limits)
    return figures


def predictions_csv(p: SplitPredictions) -> str:
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    extra = [f"score_d4_{k}" for k in range(p.per_transform.shape[1])] if p.per_transform is not None else []
    spread = p.spread
    writer.writerow(["id", "label", "score", *(["score_std"] if spread is not None else []), *extra])
    for k in range(len(p.ids)):
        per = [repr(float(v)) for v in p.per_transform[k]] if p.per_transform is not None else []
        std = [repr(float(spread[k]))] if spread is not None else []
        writer.writerow([int(p.ids[k]), int(p.labels[k]), repr(float(p.scores[k])), *std, *per])
    return handle.getvalue()


# --- report.html, section by section ---------------------------------------------------------------

HEADLINE_NAMES = (
    ("auc", "AUC"),
    ("tpr0", "TPR0"),
    ("tpr10", "TPR10"),
    ("acc_at_default", "ACC at {default:g}"),
    ("acc_at_validation", "ACC at {validation:.4f} (validation-chosen)"),
    ("average_precision", "average precision (test prevalence)"),
    ("brier", "Brier score"),
    ("ece", "expected calibration error"),
)
SURVEY_COLUMNS = (
    ("name", "threshold"),
    ("threshold", "value"),
    ("tpr", "TPR"),
    ("fpr", "FPR"),
    ("fp_shown", "test FP"),
    ("fpr_bound", "FPR (95% bound)"),
    ("expected_true", "lenses / {per}"),
    ("expected_false", "false / {per}"),
    ("expected_false_bound", "false / {per} (bound)"),
    ("precision", "precision"),
    ("precision_bound", "precision (bound)"),
)
Blocks = list[str | tuple[str, bytes]]


def _intro_block(ev: Evaluation) -> str:
    esc = html.escape
    what = f"Checkpoint <code>{esc(ev.checkpoint)}</code> (epoch {ev.epoch}, {ev.model})"
    if ev.members:
        listed = ", ".join(
            f"{esc(m['name'])} (<code>{esc(m['checkpoint'])}</code>, epoch {m['epoch']}, AUC {m['auc']:.3f})"
            for m in ev.members
        )
        what = (
            f"The mean of {len(ev.members)} networks' probabilities (an ensemble; mean spread over members "
            f"{ev.predictions.spread.mean():.4f}): {listed}"
        )
    return (
        f"<p>{what}; store "
        f"<code>{esc(ev.store)}</code>, split <b>{ev.split}</b>: {ev.n} objects, {ev.n_pos} "
        f"lenses, label rule {ev.label_rule}; test-time averaging: {ev.tta or 'none'}; device "
        f"{ev.device}. Validation-chosen threshold from {ev.thresholds.validation_source}.</p>"
    )


def _metrics_blocks(ev: Evaluation) -> Blocks:
    from lensray.evaluate.report import html_table

    m, t = ev.headline, ev.thresholds
    names = {"default": t.default, "validation": t.validation}
    rows = [{"metric": name.format(**names), "value": getattr(m, key)} for key, name in HEADLINE_NAMES]
    matrices = [
        {"threshold": f"{t.default:g}", **m.confusion_at_default.as_dict()},
        {"threshold": "validation", **m.confusion_at_validation.as_dict()},
    ]
    return [
        "<h2>Metrics</h2>",
        html_table(rows, ["metric", "value"]),
        html_table(matrices, ["threshold", "tp", "fp", "tn", "fn"]),
    ]


def _survey_blocks(ev: Evaluation) -> Blocks:
    from lensray.evaluate.report import html_table

    s = ev.survey
    per = f"{s.per:,}"
    rows = [
        row.as_dict() | {"fp_shown": f"{row.counts.fp}" + (" (FPR < bound)" if row.fpr_is_upper_bound else "")}
        for row in s.rows
    ]
    return [
        f"<h2>What a survey would see</h2><p>At a lens prevalence of {s.prevalence:g} (the test set has "
        f"{ev.n_pos / ev.n:.2f}), per {per} cutouts: expected lenses = prevalence &times; TPR &times; {per}, "
        f"false candidates = (1 &minus; prevalence) &times; FPR &times; {per}. With no false positive among the "
        f"{ev.n_neg} test non-lenses the FPR is only known to be below 3/{ev.n_neg} (95 %, rule of three): "
        "the <i>bound</i> columns use that bound (they equal the measured values otherwise).</p>",
        html_table(
            rows, [column for column, _ in SURVEY_COLUMNS], [header.format(per=per) for _, header in SURVEY_COLUMNS]
        ),
    ]


def _curve_blocks(ev: Evaluation, figures: dict[str, bytes]) -> Blocks:
    balanced = (
        " (training used balanced batches: the scores are calibrated for a 50 % prevalence, not the survey's)"
        if ev.trained_balanced
        else ""
    )
    return [
        "<h2>Curves</h2>",
        ("ROC: linear and log false-positive rate", figures["roc"]),
        ("Precision-recall on the test set (its own prevalence)", figures["precision_recall"]),
        ("Reliability: fraction of lenses per score bin" + balanced, figures["calibration"]),
    ]


def _gallery_blocks(ev: Evaluation, figures: dict[str, bytes]) -> Blocks:
    t = ev.thresholds.validation
    blocks: Blocks = ["<h2>Galleries</h2>"]
    for g in ev.galleries:
        if g.kind.name in figures:
            n_wrong = sum(g.kind.is_wrong(item.score, t) for item in g.items)
            caption = (
                f"{g.kind.title}: {n_wrong} of these {len(g.items)} are {g.kind.wrong} at the validation-chosen "
                f"threshold {t:.4f} (marked). Network inputs, one fixed range per band."
            )
            blocks.append((caption, figures[g.kind.name]))
    return blocks


def report_html(ev: Evaluation, figures: dict[str, bytes], appendix: Sequence[str | tuple[str, bytes]] = ()) -> str:
    """The self-contained report page; ``appendix`` blocks go after the galleries."""
    from lensray.evaluate.report import html_page

    blocks: Blocks = [_intro_block(ev), *_metrics_blocks(ev), *_survey_blocks(ev)]
    blocks += [*_curve_blocks(ev, figures), *_gallery_blocks(ev, figures), *appendix]
    return html_page(f"lensray evaluation: {ev.model} on {ev.split}", blocks)
