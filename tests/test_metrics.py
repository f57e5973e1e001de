"""Metrics against hand-computed values, ties and one-class edge cases, and brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lensray.evaluate import metrics

LABELS = [1, 1, 0, 1, 0, 0, 1, 0]
SCORES = [0.9, 0.8, 0.7, 0.7, 0.6, 0.3, 0.2, 0.1]


def test_acc_by_hand() -> None:
    # Called lenses (>= 0.5): the first five; right: 0.9, 0.8, 0.7(lens), 0.3, 0.1 -> 5 of 8.
    assert metrics.acc(LABELS, SCORES) == pytest.approx(5 / 8)
    # At 0.7 the threshold itself counts as a lens: 0.9, 0.8, both 0.7s called -> wrong: the 0.7 non-lens, 0.2.
    assert metrics.acc(LABELS, SCORES, threshold=0.7) == pytest.approx(6 / 8)


def test_auc_by_hand_with_a_tie() -> None:
    # Pairs won: 0.9 -> 4, 0.8 -> 4, 0.7 -> 3 + half a tie, 0.2 -> 1: 12.5 of 16.
    assert metrics.auc(LABELS, SCORES) == pytest.approx(12.5 / 16)


def test_tpr0_does_not_count_a_lens_tied_with_the_top_non_lens() -> None:
    assert metrics.tpr0(LABELS, SCORES) == pytest.approx(2 / 4)
    assert metrics.tpr_at_fp(LABELS, SCORES, max_fp=1) == pytest.approx(3 / 4)  # above the 0.6 non-lens
    assert metrics.tpr_at_fp(LABELS, SCORES, max_fp=3) == 1.0  # above the 0.1 non-lens
    assert metrics.tpr_at_fp(LABELS, SCORES, max_fp=4) == 1.0  # every threshold allowed


def test_tpr10_counts_fewer_than_ten_false_positives() -> None:
    negatives = np.arange(1.0, 13.0)  # 12 non-lenses scored 1..12; the 10th highest is 3
    positives = np.array([12.5, 11.5, 3.5, 3.0, 0.0])  # 3.0 is tied with the 10th non-lens
    labels = np.r_[np.zeros(12), np.ones(5)]
    scores = np.r_[negatives, positives]
    assert metrics.tpr10(labels, scores) == pytest.approx(3 / 5)
    assert metrics.tpr0(labels, scores) == pytest.approx(1 / 5)


def test_no_negatives_and_no_positives() -> None:
    assert metrics.tpr0([1, 1, 1], [0.1, 0.5, 0.2]) == 1.0
    assert metrics.tpr10([1], [0.0]) == 1.0
    assert math.isnan(metrics.auc([1, 1, 1], [0.1, 0.5, 0.2]))
    assert math.isnan(metrics.tpr0([0, 0], [0.1, 0.5]))
    assert math.isnan(metrics.auc([0, 0], [0.1, 0.5]))
    summary = metrics.summarise([0, 0], [0.1, 0.7])
    assert summary["acc"] == 0.5 and summary["n"] == 2 and summary["n_pos"] == 0
    assert math.isnan(summary["auc"]) and math.isnan(summary["tpr10"])
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc([1, 1], [0.2, 0.3])


def test_summarise_collects_every_metric() -> None:
    summary = metrics.summarise(LABELS, SCORES)
    assert summary == {
        "acc": pytest.approx(5 / 8),
        "auc": pytest.approx(12.5 / 16),
        "tpr0": pytest.approx(0.5),
        "tpr10": 1.0,
        "n": 8,
        "n_pos": 4,
    }


def test_roc_curve_ends_at_corners() -> None:
    curve = metrics.roc(LABELS, SCORES)
    assert curve.fpr[0] == 0 and curve.tpr[0] == 0
    assert curve.fpr[-1] == 1 and curve.tpr[-1] == 1
    assert np.all(np.diff(curve.thresholds[1:]) < 0)
    # Trapezoids under the curve give the AUC (ties included).
    area = np.sum(np.diff(curve.fpr) * (curve.tpr[1:] + curve.tpr[:-1]) / 2)
    assert area == pytest.approx(12.5 / 16)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        metrics.acc([0, 1], [0.1])
    with pytest.raises(ValueError, match="position 1 holds 2"):
        metrics.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="first at position 2"):
        metrics.summarise([0, 1, 1], [0.1, 0.2, np.nan])
    with pytest.raises(ValueError, match="empty"):
        metrics.tpr0([], [])
    with pytest.raises(ValueError, match="max_fp"):
        metrics.tpr_at_fp([0, 1], [0.1, 0.2], max_fp=-1)


def test_choose_threshold_by_hand() -> None:
    labels = [0, 0, 1, 0, 1, 1, 0]
    scores = [0.1, 0.2, 0.3, 0.4, 0.6, 0.9, 0.05]
    # ACC: 6/7 both above 0.4 and above 0.2; the higher threshold wins the tie.
    assert metrics.choose_threshold(labels, scores, "acc") == pytest.approx(0.5)
    # Youden: above 0.2 -> TPR 1, FPR 1/4 (J 0.75) beats above 0.4 -> TPR 2/3, FPR 0.
    assert metrics.choose_threshold(labels, scores, "youden") == pytest.approx(0.25)
    # Only non-lenses: call nothing a lens, just above the top score.
    top = metrics.choose_threshold([0, 0], [0.3, 0.8])
    assert top > 0.8 and metrics.acc([0, 0], [0.3, 0.8], top) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        metrics.choose_threshold([1, 1], [0.3, 0.8], "youden")


def _brute_force_tpr(labels: np.ndarray, scores: np.ndarray, max_fp: int) -> float:
    best = 0.0
    for threshold in np.r_[np.unique(scores), np.inf]:
        called = scores >= threshold
        if np.count_nonzero(called & (labels == 0)) <= max_fp:
            best = max(best, np.count_nonzero(called & (labels == 1)) / np.count_nonzero(labels))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_tpr_and_threshold_match_their_definitions_on_random_sets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = (0, 1)
    # Scores on a coarse grid so that ties between and within classes are common.
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)
    for max_fp in (0, 1, 9, 30):
        assert metrics.tpr_at_fp(labels, scores, max_fp) == pytest.approx(_brute_force_tpr(labels, scores, max_fp))
    best_acc = max(metrics.acc(labels, scores, t) for t in np.r_[np.unique(scores), np.inf])
    assert metrics.acc(labels, scores, metrics.choose_threshold(labels, scores)) == pytest.approx(best_acc)


def test_bootstrap_auc_equals_scikit_learn_on_every_resample_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + y, 1)  # rounding makes ties
    draws = rng.integers(0, 60, size=(25, 60))
    fast = metrics._bootstrap_aucs(y, scores, draws)
    for k, draw in enumerate(draws):
        assert fast[k] == pytest.approx(metrics.auc(y[draw], scores[draw]), abs=1e-12)


def test_paired_auc_difference() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    sharp, blurred = y + rng.normal(0, 0.5, 400), y + rng.normal(0, 3.0, 400)
    d = metrics.paired_auc_difference(y, sharp, blurred, resamples=500)
    assert d.difference == pytest.approx(metrics.auc(y, sharp) - metrics.auc(y, blurred))
    assert 0 < d.low < d.difference < d.high and d.p_not_better == 0.0 and d.resamples == 500
    # The same scores twice: no difference on any resample, and a can never beat b.
    same = metrics.paired_auc_difference(y, sharp, sharp, resamples=100)
    assert (same.difference, same.low, same.high, same.p_not_better) == (0.0, 0.0, 0.0, 1.0)
    # Swapped: the interval mirrors.
    swapped = metrics.paired_auc_difference(y, blurred, sharp, resamples=500)
    assert swapped.high == pytest.approx(-d.low) and swapped.p_not_better == 1.0
    assert math.isnan(metrics.paired_auc_difference(np.ones(5), np.arange(5), np.arange(5)).difference)
