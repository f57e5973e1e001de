"""Evaluation of a trained run: survey numbers and calibration by hand, D4 test-time averaging, the
report files (JSON with every number, parseable HTML, PNGs), best-checkpoint lookup, comparison."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lensray import storage
from lensray.config import load_config
from lensray.errors import CheckpointError
from lensray.evaluate.evaluate import (
    EvaluateError,
    calibration,
    confusion,
    evaluate_run,
    resolve_checkpoint,
    survey_row,
)
from lensray.ingest.store import SPLITS, LensStore, create_store, finalize_store, shard_ranges, write_shard
from lensray.train.trainer import best_checkpoint, train

SIZE = 24
N = 120

# Lenses at 0.9, 0.8, 0.7, 0.2; non-lenses at 0.7, 0.6, 0.3, 0.1.
LABELS = np.array([1, 1, 0, 1, 0, 0, 1, 0])
SCORES = np.array([0.9, 0.8, 0.7, 0.7, 0.6, 0.3, 0.2, 0.1])


# --- numbers by hand ------------------------------------------------------------------------------


def test_confusion_by_hand() -> None:
    assert confusion(LABELS, SCORES, 0.5).as_dict() == {"tp": 3, "fp": 2, "tn": 2, "fn": 1}
    assert confusion(LABELS, SCORES, 0.7).as_dict() == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}  # >= counts the tie


def test_survey_row_by_hand() -> None:
    # At 0.65: TPR = 3/4, FPR = 1/4 (the 0.7 non-lens).
    row = survey_row(LABELS, SCORES, 0.65, prevalence=0.01, per=10_000)
    assert (row.tpr, row.fpr) == (0.75, 0.25)
    assert row.expected_true == pytest.approx(0.01 * 0.75 * 10_000)  # 75
    assert row.expected_false == pytest.approx(0.99 * 0.25 * 10_000)  # 2475
    assert row.precision == pytest.approx(75 / (75 + 2475))
    assert not row.fpr_is_upper_bound and row.precision_bound == row.precision


def test_survey_row_with_no_false_positive_gives_the_rule_of_three_bound() -> None:
    # At 0.75 only the 0.9 and 0.8 lenses pass: TPR 1/2, no FP among 4 non-lenses -> FPR < 3/4.
    row = survey_row(LABELS, SCORES, 0.75, prevalence=1e-4)
    assert row.counts.fp == 0 and row.fpr == 0.0 and row.fpr_is_upper_bound
    assert row.fpr_bound == pytest.approx(3 / 4)
    assert row.expected_true == pytest.approx(1e-4 * 0.5 * 1e4)  # 0.5 lenses per 10^4
    assert row.expected_false == 0.0
    assert row.expected_false_bound == pytest.approx((1 - 1e-4) * 0.75 * 1e4)
    assert row.precision == 1.0
    assert row.precision_bound == pytest.approx(0.5 / (0.5 + (1 - 1e-4) * 0.75 * 1e4))
    # Nothing selected: precision undefined, not 0 or 1.
    empty = survey_row(LABELS, SCORES, 0.95)
    assert empty.counts.tp == 0 and empty.precision is None
    with pytest.raises(EvaluateError, match="prevalence"):
        survey_row(LABELS, SCORES, 0.5, prevalence=0.0)


def test_calibration_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0])
    scores = np.array([0.05, 0.15, 0.15, 0.85, 0.95, 0.95])
    result = calibration(labels, scores, n_bins=2)  # bins [0, 0.5) and [0.5, 1]
    assert result.counts.tolist() == [3, 3]
    np.testing.assert_allclose(result.mean_predicted, [(0.05 + 0.15 + 0.15) / 3, (0.85 + 0.95 + 0.95) / 3])
    np.testing.assert_allclose(result.fraction_positive, [1 / 3, 2 / 3])
    ece = 0.5 * abs(1 / 3 - 0.35 / 3) + 0.5 * abs(2 / 3 - 2.75 / 3)
    assert result.ece == pytest.approx(ece)
    assert result.brier == pytest.approx(np.mean((scores - labels) ** 2))


# --- a trained run --------------------------------------------------------------------------------


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus an off-centre arc for lenses: learnable, and not rotation-symmetric (so D4 views differ)."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    arc = (np.exp(-((np.hypot(yy, xx) - 6.0) ** 2) / 3.0) * (xx > 2)).astype(np.float32)
    images = rng.normal(0, 1, (len(labels), 2, SIZE, SIZE)).astype(np.float32)
    images[labels == 1] += 1.2 * arc
    return images


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("evaluate") / "store.zarr")
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.tile([0, 1], N // 2)).astype(np.int8)
    split = np.full(N, SPLITS["train"], np.int8)
    split[64:88] = SPLITS["val"]
    split[88:] = SPLITS["test"]
    meta = {
        "preprocess": {"synthetic": True},
        "label_rule": "paper",
        "bands": ["VIS", "H"],
        "source": {"images": "synthetic"},
    }
    create_store(
        url,
        ids=np.arange(700000, 700000 + N),
        labels=labels,
        split=split,
        channels=2,
        size=SIZE,
        dtype="float32",
        shard_size=40,
        meta=meta,
    )
    images = _images(labels, rng)
    for index, (lo, hi) in enumerate(shard_ranges(N, 40)):
        write_shard(url, index, images[lo:hi], np.ones(hi - lo, bool), [])
    finalize_store(url)
    return url


@pytest.fixture(scope="module")
def trained(store_url: str, tmp_path_factory: pytest.TempPathFactory, ray_cluster: None):
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "lastro.yaml",
        [
            f"data.store={store_url}",
            f"train.out={tmp_path_factory.mktemp('runs')}",
            "train.name=eval",
            "train.epochs=3",
            "train.steps_per_epoch=4",
            "train.batch_size=16",
            "train.sanity=false",
            "model.lastro.dense=[16]",
            "model.lastro.filters=4",
            "model.lastro.pairs=2",
            "train.num_to_keep=3",
        ],
    )
    return train(config)


@pytest.fixture(scope="module")
def report(trained, store_url: str, tmp_path_factory: pytest.TempPathFactory):
    return evaluate_run(trained.best_checkpoint, store_url, tmp_path_factory.mktemp("report"), gallery=4)


def _brute_tpr_at_fp(labels: np.ndarray, scores: np.ndarray, max_fp: int) -> float:
    """Highest TPR over every threshold 'score > t' (t = each score, or below all) with <= max_fp FPs."""
    best = 0.0
    for t in np.r_[np.unique(scores), -np.inf]:
        called = scores > t
        if np.sum(called & (labels == 0)) <= max_fp:
            best = max(best, np.sum(called & (labels == 1)) / np.sum(labels == 1))
    return float(best)


def test_report_numbers_match_the_predictions(report) -> None:
    with Path(report.predictions_path).open() as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    numbers = json.loads(
        Path(report.json_path).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON")
    )
    assert numbers["n"] == len(rows) == N - 88 and numbers["n_pos"] == labels.sum()
    m = numbers["metrics"]
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["tpr0"] == pytest.approx(_brute_tpr_at_fp(labels, scores, 0))
    assert m["tpr10"] == pytest.approx(_brute_tpr_at_fp(labels, scores, 9))
    assert m["acc_at_0.5"] == pytest.approx(np.mean((scores >= 0.5) == (labels == 1)))
    t = numbers["thresholds"]["validation"]
    assert m["acc_at_validation"] == pytest.approx(np.mean((scores >= t) == (labels == 1)))
    for key in ("average_precision", "brier", "ece"):
        assert isinstance(m[key], float) and 0 <= m[key] <= 1
    assert len(numbers["roc"]["fpr"]) == len(numbers["roc"]["tpr"]) == len(numbers["roc"]["thresholds"])
    assert len(numbers["precision_recall"]["precision"]) == len(numbers["precision_recall"]["recall"])
    assert sum(numbers["calibration"]["counts"]) == len(rows)
    survey = numbers["survey"]["rows"]
    assert {row["threshold"] for row in survey} >= {0.5, 0.9, 0.99, 0.999, t}
    for row in survey:
        n_neg = numbers["n_neg"]
        assert row["fpr_bound"] == pytest.approx(3 / n_neg if row["fp"] == 0 else row["fp"] / n_neg)
        assert row["expected_true"] == pytest.approx(1e-4 * row["tpr"] * 1e4)
    gallery = numbers["gallery"]
    negatives = np.sort(scores[labels == 0])[::-1][:4]
    np.testing.assert_allclose([g["score"] for g in gallery["false_positives"]], negatives)
    np.testing.assert_allclose([g["score"] for g in gallery["false_negatives"]], np.sort(scores[labels == 1])[:4])


class _Collector(HTMLParser):
    """Fails on unbalanced tags; collects <img> sources and the text."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_html(text: str) -> _Collector:
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    return parser


def test_report_files_are_well_formed(report) -> None:
    import base64

    page = parse_html(Path(report.html_path).read_text())
    assert len(page.images) == 5  # ROC, PR, calibration, two galleries
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(page.text)
    for expected in ("AUC", "TPR0", "TPR10", "What a survey would see", "rule of three", "Highest-scored non-lenses"):
        assert expected in text
    for name in ("roc", "precision_recall", "calibration", "false_positives", "false_negatives"):
        assert (Path(report.out_dir) / f"{name}.png").stat().st_size > 5_000
    summary = str(report)
    assert "AUC" in summary and report.html_path in summary


def test_writing_is_apart_from_computing(report, tmp_path: Path) -> None:
    from lensray.evaluate.evaluate import write_evaluation

    again = write_evaluation(report.evaluation, tmp_path)  # the typed result alone makes every file
    for name in ("metrics.json", "predictions.csv", "report.html", "roc.png", "false_positives.png"):
        assert (tmp_path / name).read_bytes() == (Path(report.out_dir) / name).read_bytes(), name
    assert str(again).replace(str(tmp_path), report.out_dir) == str(report)


def _d4_views(images: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square, written independently of data.d4_transform."""
    views = []
    for flipped in (images, images[..., ::-1]):
        for turns in range(4):
            views.append(np.ascontiguousarray(np.rot90(flipped, turns, axes=(-2, -1))))
    return views


def test_d4_averaging_equals_the_mean_over_the_eight_views(trained, store_url: str) -> None:
    from lensray.evaluate.inference import predict_tta
    from lensray.runs import load_run

    run = load_run(trained.best_checkpoint)
    store = LensStore.open(store_url)
    images = store.read(store.indices("test")[:10])
    direct = np.stack([run.predict(view) for view in _d4_views(images)], axis=1)
    mean, per_view = predict_tta(run, images, "d4")
    np.testing.assert_allclose(mean, direct.mean(axis=1), rtol=1e-6, atol=1e-9)
    # The same 8 views, in some order: every direct view matches one column.
    for k in range(8):
        assert min(np.abs(per_view - direct[:, [k]]).max(axis=0)) < 1e-6
    assert np.ptp(direct, axis=1).max() > 1e-4, "the views must differ for the test to mean anything"
    plain, none = predict_tta(run, images, None)
    assert none is None
    np.testing.assert_allclose(plain, direct[:, 0], rtol=1e-6)


def test_evaluate_with_tta_writes_every_view(trained, store_url: str, tmp_path: Path) -> None:
    result = evaluate_run(trained.run_url, store_url, tmp_path, tta="d4", gallery=2)
    assert result.evaluation.tta == "d4" and "re-scored" in result.evaluation.thresholds.validation_source
    assert result.numbers == json.loads(Path(result.json_path).read_text())  # the typed result is what was written
    with Path(result.predictions_path).open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[:5]:
        views = [float(row[f"score_d4_{k}"]) for k in range(8)]
        assert float(row["score"]) == pytest.approx(np.mean(views), rel=1e-12)


def test_best_checkpoint_of_a_run_folder(trained) -> None:
    import torch

    history = json.loads((Path(trained.run_url) / "history.json").read_text())
    best_epoch = max(history, key=lambda row: row["val_auc"])["epoch"]  # max() keeps the first: the earliest tie
    found = best_checkpoint(trained.run_url)
    assert found.url == trained.best_checkpoint, "train's outcome and a run-folder lookup use the same rule"
    assert found.metrics["epoch"] == found.best_epoch == best_epoch  # num_to_keep=3 of 3 epochs: all kept
    assert torch.load(Path(found.url) / "state.pt", weights_only=True)["epoch"] == best_epoch
    assert json.loads((Path(found.url) / "epoch.json").read_text()) == {"epoch": best_epoch}
    assert resolve_checkpoint(found.url) == found.url
    assert resolve_checkpoint(trained.run_url) == found.url
    with pytest.raises(
        CheckpointError, match=r"nothing-here is not a checkpoint folder .*nothing-here is not a run folder"
    ):
        resolve_checkpoint(str(Path(trained.run_url) / "nothing-here"))


def test_evaluate_refuses_a_store_of_another_geometry(trained, tmp_path: Path) -> None:
    url = str(tmp_path / "other.zarr")
    meta = {"preprocess": {"synthetic": True}, "label_rule": "paper", "bands": ["VIS"], "source": {"images": "x"}}
    create_store(
        url,
        ids=np.arange(4),
        labels=np.array([0, 1, 0, 1], np.int8),
        split=np.full(4, 2, np.int8),
        channels=1,
        size=SIZE,
        dtype="float32",
        shard_size=4,
        meta=meta,
    )
    write_shard(url, 0, np.zeros((4, 1, SIZE, SIZE), np.float32), np.ones(4, bool), [])
    finalize_store(url)
    with pytest.raises(EvaluateError, match=r"1x24x24 images; the network .* takes 2x24x24"):
        evaluate_run(trained.best_checkpoint, url, tmp_path / "out")


def test_compare_table_of_two_runs(trained, store_url: str, tmp_path: Path) -> None:
    from lensray.evaluate.compare import compare_runs

    table = compare_runs([trained.run_url, trained.best_checkpoint], tmp_path, names=["folder", "checkpoint"])
    assert [row["name"] for row in table.rows] == ["folder", "checkpoint"]
    assert [row.name for row in table.comparison.rows] == ["folder", "checkpoint"] and len(table.comparison.rocs) == 2
    first, second = table.rows
    assert first["checkpoint"] == second["checkpoint"]  # the folder resolves to its best checkpoint
    assert first["auc"] == pytest.approx(second["auc"])
    store = LensStore.open(store_url)
    test_labels = store.labels[store.indices("test")]
    assert first["n"] == len(test_labels) and first["n_pos"] == int(test_labels.sum())
    assert first["epochs"] == len(json.loads((Path(trained.run_url) / "history.json").read_text()))
    assert math.isfinite(first["train_s"]) and first["train_s"] > 0
    markdown = Path(table.markdown_path).read_text()
    assert "| folder |" in markdown and "AUC" in markdown
    page = parse_html(Path(table.html_path).read_text())
    assert len(page.images) == 1
    assert json.loads(Path(table.json_path).read_text())["rows"][0]["name"] == "folder"
    # The same checkpoint twice is one paired comparison on the same objects, with no difference at all.
    assert table.paired == [
        {
            "better": "folder",
            "worse": "checkpoint",
            "delta_auc": 0.0,
            "low": 0.0,
            "high": 0.0,
            "p_not_better": 1.0,
            "n": first["n"],
            "resamples": 2000,
        }
    ]
    assert "Paired AUC differences" in markdown
    history = json.loads((Path(trained.run_url) / "history.json").read_text())
    assert first["train_images"] == sum(row["train_samples"] for row in history) > 0


def test_cli_evaluate_and_compare(trained, store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lensray.cli import main

    assert (
        main(
            [
                "evaluate",
                "--run",
                trained.run_url,
                "--store",
                store_url,
                "--out",
                str(tmp_path / "e"),
                "--prevalence",
                "0.001",
                "--gallery",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "AUC" in printed and "survey at prevalence 0.001" in printed
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["survey"]["prevalence"] == 0.001
    assert main(["compare", trained.best_checkpoint, "--out", str(tmp_path / "c"), "--names", "only"]) == 0
    assert "| only |" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(tmp_path / "nope"), "--store", store_url, "--out", str(tmp_path / "x")]) == 1
    assert "nope is not a checkpoint folder" in capsys.readouterr().err


def test_cli_evaluate_and_compare_write_to_s3(
    trained, store_url: str, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lensray.cli import main

    out = storage.join(s3_bucket, "reports", "eval")
    assert main(["evaluate", "--run", trained.run_url, "--store", store_url, "--out", out, "--gallery", "2"]) == 0
    assert f"report: {out}/report.html" in capsys.readouterr().out
    page = parse_html(storage.read_bytes(storage.join(out, "report.html")).decode())
    assert len(page.images) == 5
    numbers = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    assert numbers["checkpoint"] == trained.best_checkpoint
    rows = list(csv.DictReader(storage.read_bytes(storage.join(out, "predictions.csv")).decode().splitlines()))
    assert len(rows) == numbers["n"]
    for name in ("roc", "precision_recall", "calibration", "false_positives", "false_negatives"):
        assert storage.read_bytes(storage.join(out, f"{name}.png"))[:8] == b"\x89PNG\r\n\x1a\n"

    out = storage.join(s3_bucket, "reports", "compare")
    assert main(["compare", trained.run_url, "--out", out, "--names", "remote"]) == 0
    printed = capsys.readouterr().out
    assert "| remote |" in printed and f"{out}/compare.md" in printed
    assert "| remote |" in storage.read_bytes(storage.join(out, "compare.md")).decode()
    assert (
        json.loads(storage.read_bytes(storage.join(out, "compare.json")))["rows"][0]["checkpoint"]
        == trained.best_checkpoint
    )
    assert len(parse_html(storage.read_bytes(storage.join(out, "compare.html")).decode()).images) == 1
    assert storage.read_bytes(storage.join(out, "compare_roc.png"))[:8] == b"\x89PNG\r\n\x1a\n"
