"""Lens-finding metrics: ACC, ROC, AUC and the challenge's TPR0 / TPR10 (Metcalf et al. 2019).

``labels`` are 0 (non-lens) / 1 (lens); ``scores`` are any real numbers that rank lenses higher
(sigmoid probabilities or logits). A sample is called a lens when ``score >= threshold``.

Undefined metrics are NaN, never a made-up number: AUC when ``labels`` hold one class only, a TPR
when there are no lenses. Malformed input (length mismatch, labels other than 0/1, non-finite
scores, nothing at all) raises ``ValueError`` naming the problem and the first offending position.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score, roc_curve


class RocCurve(NamedTuple):
    """False- and true-positive rates at decreasing ``thresholds`` (scikit-learn's ``roc_curve``)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def _checked(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"labels and scores differ in length: {y.size} labels, {s.size} scores")
    if y.size == 0:
        raise ValueError("no samples: labels and scores are empty")
    not_binary = ~np.isin(y, (0, 1))
    if not_binary.any():
        first = int(np.flatnonzero(not_binary)[0])
        raise ValueError(f"labels must be 0 or 1; position {first} holds {y[first].item()!r}")
    not_finite = ~np.isfinite(s)
    if not_finite.any():
        first = int(np.flatnonzero(not_finite)[0])
        raise ValueError(f"{int(not_finite.sum())} non-finite score(s); first at position {first}: {s[first].item()!r}")
    return y.astype(np.int8), s


def acc(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> float:
    """Fraction of samples classified correctly when a lens is ``score >= threshold``."""
    y, s = _checked(labels, scores)
    return float(np.mean((s >= threshold) == (y == 1)))


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; NaN when ``labels`` hold only one class (the ROC is undefined).

    Callers that must have a number (early stopping, Tune) should check ``math.isnan``; a validation
    set with one class is a data problem worth an error there, not here.
    """
    y, s = _checked(labels, scores)
    if y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, s))


def roc(labels: ArrayLike, scores: ArrayLike) -> RocCurve:
    """The full ROC curve (every distinct threshold kept, for plots and threshold tables).

    Raises ``ValueError`` when one class is missing: one of the two rates would be 0/0.
    """
    y, s = _checked(labels, scores)
    if y.min() == y.max():
        raise ValueError(f"ROC needs both classes; all {y.size} labels are {int(y[0])}")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return RocCurve(fpr, tpr, thresholds)


def tpr_at_fp(labels: ArrayLike, scores: ArrayLike, max_fp: int) -> float:
    """The highest true-positive rate over thresholds that admit at most ``max_fp`` false positives.

    TPR0 (no false positive at all) is ``max_fp=0``; TPR10 ("fewer than ten false positives",
    Metcalf et al. 2019) is ``max_fp=9``. The best threshold lies just above the ``max_fp + 1``-th
    highest non-lens score, so only lenses scored strictly above it count: a lens tied with that
    non-lens cannot be separated from it. With ``max_fp`` or fewer non-lenses every threshold
    qualifies and the rate is 1. NaN when there are no lenses.
    """
    if max_fp < 0:
        raise ValueError(f"max_fp must be >= 0, got {max_fp}")
    y, s = _checked(labels, scores)
    positives = s[y == 1]
    if positives.size == 0:
        return math.nan
    negatives = s[y == 0]
    if negatives.size <= max_fp:
        return 1.0
    # The (max_fp+1)-th highest non-lens score: partition instead of a full sort.
    cutoff = -np.partition(-negatives, max_fp)[max_fp]
    return float(np.count_nonzero(positives > cutoff) / positives.size)


def tpr0(labels: ArrayLike, scores: ArrayLike) -> float:
    """Highest TPR before the first false positive (Metcalf et al. 2019)."""
    return tpr_at_fp(labels, scores, max_fp=0)


def tpr10(labels: ArrayLike, scores: ArrayLike) -> float:
    """Highest TPR with fewer than ten false positives (Metcalf et al. 2019)."""
    return tpr_at_fp(labels, scores, max_fp=9)


def summarise(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> dict[str, float | int]:
    """``{"acc", "auc", "tpr0", "tpr10", "n", "n_pos"}`` for one labelled set (NaN where undefined)."""
    y, s = _checked(labels, scores)
    return {
        "acc": acc(y, s, threshold),
        "auc": auc(y, s),
        "tpr0": tpr0(y, s),
        "tpr10": tpr10(y, s),
        "n": int(y.size),
        "n_pos": int(np.count_nonzero(y)),
    }


def choose_threshold(labels: ArrayLike, scores: ArrayLike, criterion: Literal["acc", "youden"] = "acc") -> float:
    """The decision threshold that maximises ``criterion`` on a labelled (validation) set.

    ``"acc"``: accuracy; ``"youden"``: Youden's J = TPR - FPR (needs both classes). The threshold is
    the midpoint between the two distinct scores it separates, so it does not sit on a training
    score; the first of equally good thresholds (the highest) wins. Apply it as ``score >= t``.
    """
    y, s = _checked(labels, scores)
    if criterion not in ("acc", "youden"):
        raise ValueError(f"unknown criterion {criterion!r}; choose 'acc' or 'youden'")
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if criterion == "youden" and (n_pos == 0 or n_neg == 0):
        raise ValueError(f"Youden's J needs both classes; got {n_pos} lenses and {n_neg} non-lenses")

    # Candidate k calls the k highest distinct scores lenses (k = 0: nothing is a lens).
    distinct, inverse = np.unique(s, return_inverse=True)  # ascending
    pos_per_score = np.bincount(inverse, weights=(y == 1), minlength=distinct.size)[::-1]
    neg_per_score = np.bincount(inverse, weights=(y == 0), minlength=distinct.size)[::-1]
    tp = np.concatenate([[0.0], np.cumsum(pos_per_score)])
    fp = np.concatenate([[0.0], np.cumsum(neg_per_score)])
    objective = (tp + (n_neg - fp)) / y.size if criterion == "acc" else tp / n_pos - fp / n_neg
    best = int(np.argmax(objective))

    descending = distinct[::-1]
    if best == 0:  # call nothing a lens: just above the highest score
        return float(np.nextafter(descending[0], np.inf))
    if best == descending.size:  # call everything a lens
        return float(descending[-1])
    higher, lower = descending[best - 1], descending[best]
    midpoint = (higher + lower) / 2
    # Adjacent floats have no midpoint between them; the higher score itself still separates.
    return float(midpoint if lower < midpoint <= higher else higher)


class AucDifference(NamedTuple):
    """AUC(a) - AUC(b) on the same objects, with a paired-bootstrap 95 % interval."""

    difference: float
    low: float  # 2.5 % bootstrap quantile
    high: float  # 97.5 % bootstrap quantile
    p_not_better: float  # fraction of resamples with AUC(a) <= AUC(b): a one-sided bootstrap p-value
    resamples: int


def _bootstrap_aucs(y: np.ndarray, scores: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """AUC of ``scores`` on each resample (rows of ``draws``), from average ranks (Mann-Whitney U)."""
    from scipy.stats import rankdata

    labels = y[draws]
    ranks = rankdata(scores[draws], method="average", axis=1)
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    u = (ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def paired_auc_difference(
    labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike, resamples: int = 2000, seed: int = 0
) -> AucDifference:
    """How much better ``scores_a`` ranks the same objects than ``scores_b``: AUC(a) - AUC(b) and a
    paired bootstrap (objects resampled together, so the shared difficulty of the set cancels).

    Resamples that hold a single class are dropped; NaN everywhere when ``labels`` hold one class.
    """
    y, a = _checked(labels, scores_a)
    _, b = _checked(labels, scores_b)
    if y.sum() in (0, y.size):
        return AucDifference(math.nan, math.nan, math.nan, math.nan, 0)
    draws = np.random.default_rng(seed).integers(0, y.size, size=(resamples, y.size))
    both = (y[draws].sum(axis=1) > 0) & (y[draws].sum(axis=1) < y.size)
    draws = draws[both]
    y = y.astype(np.int64)
    diffs = _bootstrap_aucs(y, a, draws) - _bootstrap_aucs(y, b, draws)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return AucDifference(auc(y, a) - auc(y, b), float(low), float(high), float(np.mean(diffs <= 0)), len(draws))
