"""Evaluate a trained run on a store's split: every number, the plots and one self-contained HTML report.

``evaluate_run`` predicts the split in batches from the store (optionally averaging the 8 D4 views),
then computes ACC at 0.5 and at the threshold chosen on the run's validation predictions, ROC / AUC,
TPR0 / TPR10 (``metrics``), precision-recall, a reliability curve, and what a survey would see: at a
realistic lens prevalence (default 1 in 10^4, where the test set is roughly balanced), the expected
true and false candidates per 10^4 cutouts and their precision, from the measured TPR and FPR. An FPR
of 0 on the test set is not 0 in a survey: it is reported with its 95 % upper bound 3 / n_neg (the rule
of three), and the precision with the matching lower bound. Galleries show the highest-scored
non-lenses and the lowest-scored lenses as the network saw them.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from lensray import storage
from lensray.errors import EvaluateError
from lensray.evaluate import metrics
from lensray.evaluate.inference import PREDICT_BATCH, SplitPredictions, predict_split, predict_tta
from lensray.runs import MODEL_INPUT_FILE, resolve_checkpoint

DEFAULT_PREVALENCE = 1e-4  # lenses per cutout in a survey (order of magnitude for Euclid)
PER_CUTOUTS = 10_000  # survey numbers are per this many cutouts
SURVEY_THRESHOLDS = (0.5, 0.9, 0.99, 0.999)  # plus the validation-chosen one
CALIBRATION_BINS = 10
GALLERY_SIZE = 8
RULE_OF_THREE = 3.0  # 95 % upper bound on a rate with 0 events in n trials: 3 / n
REPORT_HTML, REPORT_JSON, PREDICTIONS_CSV = "report.html", "metrics.json", "predictions.csv"


# --- which checkpoint -----------------------------------------------------------------------------


# --- numbers --------------------------------------------------------------------------------------


def confusion(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, int]:
    """Counts of true/false positives/negatives when a lens is ``score >= threshold``."""
    y, s = np.asarray(labels) == 1, np.asarray(scores, dtype=np.float64) >= threshold
    return {"tp": int(np.sum(y & s)), "fp": int(np.sum(~y & s)), "tn": int(np.sum(~y & ~s)), "fn": int(np.sum(y & ~s))}


def survey_row(
    labels: ArrayLike,
    scores: ArrayLike,
    threshold: float,
    prevalence: float = DEFAULT_PREVALENCE,
    per: int = PER_CUTOUTS,
) -> dict[str, Any]:
    """What a survey of ``per`` cutouts with lens fraction ``prevalence`` would get at ``threshold``.

    expected true = prevalence x TPR x per; expected false = (1 - prevalence) x FPR x per;
    precision = true / (true + false). With no false positive among the n_neg test non-lenses the
    measured FPR of 0 only says FPR < 3 / n_neg (95 %, the rule of three), so the false count and the
    precision are also given at that bound (``*_bound``; with FP > 0 the bound columns repeat the
    measured values). Precision is None when nothing would be selected.
    """
    if not 0 < prevalence < 1:
        raise EvaluateError(f"prevalence must be in (0, 1), got {prevalence}")
    counts = confusion(labels, scores, threshold)
    n_pos, n_neg = counts["tp"] + counts["fn"], counts["fp"] + counts["tn"]
    if n_pos == 0 or n_neg == 0:
        raise EvaluateError(f"survey numbers need lenses and non-lenses; got {n_pos} and {n_neg}")
    tpr, fpr = counts["tp"] / n_pos, counts["fp"] / n_neg
    fpr_bound = RULE_OF_THREE / n_neg if counts["fp"] == 0 else fpr
    expected_true = prevalence * tpr * per
    expected_false = (1 - prevalence) * fpr * per
    expected_false_bound = (1 - prevalence) * fpr_bound * per

    def precision(true: float, false: float) -> float | None:
        return true / (true + false) if true + false > 0 else None

    return {
        "threshold": float(threshold),
        **counts,
        "tpr": tpr,
        "fpr": fpr,
        "fpr_is_upper_bound": counts["fp"] == 0,
        "fpr_bound": fpr_bound,
        "expected_true": expected_true,
        "expected_false": expected_false,
        "expected_false_bound": expected_false_bound,
        "precision": precision(expected_true, expected_false),
        "precision_bound": precision(expected_true, expected_false_bound),
        "prevalence": prevalence,
        "per": per,
    }


def calibration(labels: ArrayLike, scores: ArrayLike, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
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
    return {
        "edges": edges,
        "counts": counts,
        "mean_predicted": mean_full,
        "fraction_positive": fraction_full,
        "ece": ece,
        "brier": float(brier_score_loss(y, s)),
    }


def precision_recall(labels: ArrayLike, scores: ArrayLike) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    return {
        "precision": precision,
        "recall": recall,
        "thresholds": thresholds,
        "average_precision": float(average_precision_score(labels, scores)),
    }


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


# --- predictions for a split ---------------------------------------------------------------------


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


def validation_threshold(run: Any, store: Any, tta: str | None) -> tuple[float, str]:
    """The ACC-maximising threshold on the run's validation set, scored like the evaluated split."""

    stored = run.val_predictions()
    labels, scores = stored["labels"], stored["scores"]
    source = "the checkpoint's stored validation predictions"
    if tta:
        position = {int(i): k for k, i in enumerate(store.ids)}
        rows = [position.get(int(i)) for i in stored["ids"]]
        if all(r is not None and store.valid[r] for r in rows):
            scores = np.concatenate(
                [
                    predict_tta(run, store.read(np.asarray(rows[k : k + PREDICT_BATCH])), tta)[0]
                    for k in range(0, len(rows), PREDICT_BATCH)
                ]
            )
            source = f"the validation set re-scored with {tta} test-time averaging"
        else:
            source += f" (without {tta}: the validation IDs are not in {store.url})"
    return metrics.choose_threshold(labels, scores, "acc"), source


# --- the report ----------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    # URLs (local paths or s3://), as strings: the report may live in object storage.
    out_dir: str
    html_path: str
    json_path: str
    predictions_path: str
    numbers: dict[str, Any]

    def __str__(self) -> str:
        n = self.numbers
        m, t = n["metrics"], n["thresholds"]
        survey = next(row for row in n["survey"]["rows"] if row["threshold"] == t["validation"])

        def f(value: Any, digits: int = 3) -> str:
            return "n/a" if value is None else f"{value:.{digits}f}"

        bound = " (upper bound: no FP on test)" if survey["fpr_is_upper_bound"] else ""
        lines = [
            f"evaluation of {n['checkpoint']} on {n['store']} [{n['split']}, {n['n']} objects, {n['n_pos']} lenses, "
            f"TTA {n['tta'] or 'none'}]",
            f"  AUC {f(m['auc'])}  ACC@0.5 {f(m['acc_at_0.5'])}  ACC@{t['validation']:.3f} (val-chosen) "
            f"{f(m['acc_at_validation'])}  TPR0 {f(m['tpr0'])}  TPR10 {f(m['tpr10'])}  AP {f(m['average_precision'])}",
            f"  survey at prevalence {n['survey']['prevalence']:g}, per {n['survey']['per']} cutouts, threshold "
            f"{t['validation']:.3f}: {survey['expected_true']:.2f} lenses, {f(survey['expected_false_bound'], 1)} "
            f"false{bound}, precision {f(survey['precision_bound'])}",
            f"  report: {self.html_path}",
            f"  numbers: {self.json_path}",
        ]
        return "\n".join(lines)


def evaluate_run(
    checkpoint_url: str,
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
    """Evaluate ``checkpoint_url`` (a checkpoint or a run folder: its best) on ``split`` of ``store_url``;
    write ``report.html``, ``metrics.json``, ``predictions.csv`` and the PNGs into ``out_dir`` (a local
    folder or an s3:// prefix: every file is rendered in memory and written through ``storage``).
    ``appendix``: more report blocks (HTML, or (caption, PNG) pairs) placed after the galleries, e.g. a
    comparison with other runs (``compare.ComparisonTable.html_blocks``)."""
    from lensray.evaluate.inference import check_tta
    from lensray.ingest.store import LensStore
    from lensray.runs import load_run

    tta = check_tta(tta)
    if not 0 < prevalence < 1:
        raise EvaluateError(f"prevalence must be in (0, 1), got {prevalence}")
    checkpoint_url = resolve_checkpoint(checkpoint_url)
    run = load_run(checkpoint_url, device=device)
    store = LensStore.open(store_url)
    _check_geometry(checkpoint_url, store)
    predictions = predict_split(run, store, split, tta, batch_size)
    y, s = predictions.labels, predictions.scores
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise EvaluateError(
            f"{store_url}: the {split} split has {n_pos} lenses of {y.size}; ROC and AUC need both classes"
        )
    chosen, chosen_source = validation_threshold(run, store, tta)
    roc = metrics.roc(y, s)
    pr = precision_recall(y, s)
    reliability = calibration(y, s)
    levels = sorted({*thresholds, chosen})
    survey = [
        survey_row(y, s, t, prevalence) | {"name": "validation-chosen" if t == chosen else f"{t:g}"} for t in levels
    ]
    numbers: dict[str, Any] = {
        "checkpoint": checkpoint_url,
        "store": store_url,
        "split": split,
        "tta": tta,
        "device": device,
        "epoch": run.epoch,
        "model": run.config.model.name,
        "label_rule": store.meta.get("label_rule"),
        "bands": store.meta.get("bands"),
        "transform": store.meta.get("transform"),
        "n": int(y.size),
        "n_pos": n_pos,
        "n_neg": int(y.size - n_pos),
        "thresholds": {
            "default": 0.5,
            "validation": chosen,
            "validation_criterion": "acc",
            "validation_source": chosen_source,
        },
        "metrics": {
            "auc": metrics.auc(y, s),
            "tpr0": metrics.tpr0(y, s),
            "tpr10": metrics.tpr10(y, s),
            "acc_at_0.5": metrics.acc(y, s, 0.5),
            "acc_at_validation": metrics.acc(y, s, chosen),
            "confusion_at_0.5": confusion(y, s, 0.5),
            "confusion_at_validation": confusion(y, s, chosen),
            "average_precision": pr["average_precision"],
            "brier": reliability["brier"],
            "ece": reliability["ece"],
        },
        "roc": roc._asdict(),
        "precision_recall": pr,
        "calibration": reliability,
        "survey": {
            "prevalence": prevalence,
            "per": PER_CUTOUTS,
            "rule": "FPR < 3/n_neg (95%) when no FP",
            "rows": survey,
        },
        "timing": {
            "predict_s": predictions.seconds,
            "images_per_s": y.size * (8 if tta else 1) / max(predictions.seconds, 1e-9),
        },
        "run_metrics": run.metrics,
        "trained_balanced": run.config.train.balanced,
    }

    out = str(out_dir).rstrip("/")
    galleries = _galleries(store, predictions, gallery)
    numbers["gallery"] = {
        name: [{"id": i, "score": sc} for i, sc, _ in items] for name, (items, _) in galleries.items()
    }
    bands = store.meta.get("bands") or [f"band {k}" for k in range(store.sample_shape[0])]
    figures = _figures(numbers, galleries, bands)
    for name, png in figures.items():
        storage.write_bytes(storage.join(out, f"{name}.png"), png)
    json_path = storage.join(out, REPORT_JSON)
    storage.write_bytes(json_path, json.dumps(jsonable(numbers), indent=1, allow_nan=False).encode())
    predictions_path = storage.join(out, PREDICTIONS_CSV)
    storage.write_bytes(predictions_path, _predictions_csv(predictions).encode())
    html_path = storage.join(out, REPORT_HTML)  # last: its presence says the report is complete
    storage.write_bytes(html_path, _report_html(numbers, figures, galleries, appendix).encode())
    return EvaluationReport(
        out_dir=out, html_path=html_path, json_path=json_path, predictions_path=predictions_path, numbers=numbers
    )


def _galleries(store: Any, p: SplitPredictions, size: int) -> dict[str, tuple[list, np.ndarray | None]]:
    """The ``size`` highest-scored non-lenses and lowest-scored lenses: (id, score, row) and images."""
    out = {}
    for name, label, order in (("false_positives", 0, -1), ("false_negatives", 1, 1)):
        members = np.flatnonzero(p.labels == label)
        ranked = members[np.argsort(order * p.scores[members], kind="stable")][:size]
        items = [(int(p.ids[k]), float(p.scores[k]), int(p.rows[k])) for k in ranked]
        images = store.read(np.array([row for *_, row in items], dtype=np.int64)).astype(np.float32) if items else None
        out[name] = (items, images)
    return out


def _figures(numbers: dict[str, Any], galleries: dict, bands: list[str]) -> dict[str, bytes]:
    from lensray.evaluate import report

    label = f"{numbers['model']} (AUC {numbers['metrics']['auc']:.3f})"
    roc, pr, cal = numbers["roc"], numbers["precision_recall"], numbers["calibration"]
    figures = {
        "roc": report.roc_png(
            [report.Curve(label, roc["fpr"], roc["tpr"])],
            title=f"ROC, {numbers['split']} split",
            min_fpr=1.0 / numbers["n_neg"],
        ),
        "precision_recall": report.pr_png(
            [report.Curve(label, pr["recall"], pr["precision"])], prevalence=numbers["n_pos"] / numbers["n"]
        ),
        "calibration": report.calibration_png(
            cal["mean_predicted"], cal["fraction_positive"], cal["counts"], cal["edges"]
        ),
    }
    shown = [images for items, images in galleries.values() if images is not None]
    if shown:
        limits = report.display_limits(np.concatenate(shown))  # one scale for both galleries
        t = numbers["thresholds"]["validation"]
        for name, (items, images) in galleries.items():
            if images is None:
                continue
            kind = "FP" if name == "false_positives" else "FN"
            captions = [
                f"ID {i}\n{score:.4f}{' ' + kind if (score >= t) == (kind == 'FP') else ''}" for i, score, _ in items
            ]
            figures[name] = report.gallery_png(images, captions, bands, per_row=max(1, 12 // len(bands)), limits=limits)
    return figures


def _predictions_csv(p: SplitPredictions) -> str:
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    extra = [f"score_d4_{k}" for k in range(p.per_transform.shape[1])] if p.per_transform is not None else []
    writer.writerow(["id", "label", "score", *extra])
    for k in range(len(p.ids)):
        per = [repr(float(v)) for v in p.per_transform[k]] if p.per_transform is not None else []
        writer.writerow([int(p.ids[k]), int(p.labels[k]), repr(float(p.scores[k])), *per])
    return handle.getvalue()


def _report_html(
    numbers: dict[str, Any],
    figures: dict[str, bytes],
    galleries: dict,
    appendix: Sequence[str | tuple[str, bytes]] = (),
) -> str:
    from lensray.evaluate.report import html_page, html_table

    esc = html.escape
    m, t, survey = numbers["metrics"], numbers["thresholds"], numbers["survey"]
    headline = [
        {"metric": "AUC", "value": m["auc"]},
        {"metric": "TPR0", "value": m["tpr0"]},
        {"metric": "TPR10", "value": m["tpr10"]},
        {"metric": "ACC at 0.5", "value": m["acc_at_0.5"]},
        {"metric": f"ACC at {t['validation']:.4f} (validation-chosen)", "value": m["acc_at_validation"]},
        {"metric": "average precision (test prevalence)", "value": m["average_precision"]},
        {"metric": "Brier score", "value": m["brier"]},
        {"metric": "expected calibration error", "value": m["ece"]},
    ]
    rows = [
        {**row, "fp_shown": f"{row['fp']}" + (" (FPR < bound)" if row["fpr_is_upper_bound"] else "")}
        for row in survey["rows"]
    ]
    per = f"{survey['per']:,}"
    blocks: list[str | tuple[str, bytes]] = [
        f"<p>Checkpoint <code>{esc(numbers['checkpoint'])}</code> (epoch {numbers['epoch']}, {numbers['model']}); store "
        f"<code>{esc(numbers['store'])}</code>, split <b>{numbers['split']}</b>: {numbers['n']} objects, {numbers['n_pos']} "
        f"lenses, label rule {numbers['label_rule']}; test-time averaging: {numbers['tta'] or 'none'}; device "
        f"{numbers['device']}. Validation-chosen threshold from {t['validation_source']}.</p>",
        "<h2>Metrics</h2>",
        html_table(headline, ["metric", "value"]),
        html_table(
            [{"threshold": k.split("_at_")[-1], **v} for k, v in m.items() if k.startswith("confusion")],
            ["threshold", "tp", "fp", "tn", "fn"],
        ),
        f"<h2>What a survey would see</h2><p>At a lens prevalence of {survey['prevalence']:g} (the test set has "
        f"{numbers['n_pos'] / numbers['n']:.2f}), per {per} cutouts: expected lenses = prevalence &times; TPR &times; {per}, "
        f"false candidates = (1 &minus; prevalence) &times; FPR &times; {per}. With no false positive among the "
        f"{numbers['n_neg']} test non-lenses the FPR is only known to be below 3/{numbers['n_neg']} (95 %, rule of three): "
        "the <i>bound</i> columns use that bound (they equal the measured values otherwise).</p>",
        html_table(
            rows,
            [
                "name",
                "threshold",
                "tpr",
                "fpr",
                "fp_shown",
                "fpr_bound",
                "expected_true",
                "expected_false",
                "expected_false_bound",
                "precision",
                "precision_bound",
            ],
            [
                "threshold",
                "value",
                "TPR",
                "FPR",
                "test FP",
                "FPR (95% bound)",
                f"lenses / {per}",
                f"false / {per}",
                f"false / {per} (bound)",
                "precision",
                "precision (bound)",
            ],
        ),
        "<h2>Curves</h2>",
        ("ROC: linear and log false-positive rate", figures["roc"]),
        ("Precision-recall on the test set (its own prevalence)", figures["precision_recall"]),
        (
            "Reliability: fraction of lenses per score bin"
            + (
                " (training used balanced batches: the scores are calibrated for a 50 % prevalence, not the survey's)"
                if numbers["trained_balanced"]
                else ""
            ),
            figures["calibration"],
        ),
        "<h2>Galleries</h2>",
    ]
    for name, title in (("false_positives", "Highest-scored non-lenses"), ("false_negatives", "Lowest-scored lenses")):
        if name in figures:
            kind = "false positives" if name == "false_positives" else "false negatives"
            n_wrong = sum((sc >= t["validation"]) == (name == "false_positives") for _, sc, _ in galleries[name][0])
            blocks.append(
                (
                    f"{title}: {n_wrong} of these {len(galleries[name][0])} are {kind} at the validation-chosen "
                    f"threshold {t['validation']:.4f} (marked). Network inputs, one fixed range per band.",
                    figures[name],
                )
            )
    blocks.extend(appendix)
    return html_page(f"lensray evaluation: {numbers['model']} on {numbers['split']}", blocks)
