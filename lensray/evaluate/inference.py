"""Scores for images: D4 test-time averaging over a loaded run, and whole store splits in batches.

``predict_tta`` is the one place that turns preprocessed images into scores for ``evaluate``,
``compare`` and ``score``; ``predict_scored`` also takes an ensemble (``evaluate.ensemble``), whose members
each go through ``predict_tta``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lensray.errors import EvaluateError, ScoreError
from lensray.profiles import SurveyProfile
from lensray.runtime import progress
from lensray.sky.symmetry import D4_ELEMENTS, d4_transform

if TYPE_CHECKING:
    from lensray.runs import ModelInput

PREDICT_BATCH = 128


def check_tta(tta: str | None) -> str | None:
    if tta not in (None, "none", "d4"):
        raise ScoreError(f"unknown test-time augmentation {tta!r}; choose d4 or leave it out")
    return None if tta == "none" else tta


def predict_tta(
    run: Any, images: np.ndarray | torch.Tensor, tta: str | None = None, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(scores (N,), per-transform scores (N, 8) or None)`` for (N, C, H, W) preprocessed images.

    ``run`` is a ``runs.Run`` (anything with ``predict(images, batch_size)``). With ``tta="d4"`` the
    score is the mean of the probabilities over the 8 elements of D4 (``sky.symmetry.d4_transform``): a sky
    cutout has no preferred orientation, so each is an equally valid view of the object. Probabilities
    are averaged, not logits, so the result is still the mean of what the network says per view.
    """
    tta = check_tta(tta)
    tensor = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images, dtype=np.float32))
    if tta is None:
        return run.predict(tensor, batch_size=batch_size), None
    if tensor.shape[-1] != tensor.shape[-2]:
        raise ScoreError(f"D4 test-time averaging needs square images, got {tuple(tensor.shape[-2:])}")
    per_transform = np.stack(
        [run.predict(d4_transform(tensor, k).contiguous(), batch_size=batch_size) for k in range(D4_ELEMENTS)], axis=1
    )
    return per_transform.mean(axis=1), per_transform


def member_spread(members: np.ndarray | None) -> np.ndarray | None:
    """The standard deviation over an ensemble's members (axis 1; numpy's population std, ddof=0)."""
    return None if members is None else members.std(axis=1)


@dataclass(frozen=True, eq=False)
class Scored:
    """Scores of a batch: the mean, the D4 views (N, 8) with test-time averaging, and for an ensemble
    every member's own score (N, M), whose spread over members is ``spread``."""

    scores: np.ndarray
    per_transform: np.ndarray | None
    members: np.ndarray | None = None

    @property
    def spread(self) -> np.ndarray | None:
        return member_spread(self.members)


def predict_scored(run: Any, images: np.ndarray | torch.Tensor, tta: str | None, batch_size: int = 256) -> Scored:
    """``predict_tta`` for a run; for an ensemble (anything with ``predict_members``) the members' mean,
    each member with its own test-time averaging, and every member's score."""
    if hasattr(run, "predict_members"):
        return run.predict_members(images, check_tta(tta), batch_size=batch_size)
    return Scored(*predict_tta(run, images, tta, batch_size=batch_size))


@dataclass(frozen=True, eq=False)
class SplitPredictions:
    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    per_transform: np.ndarray | None  # (N, 8) with D4 test-time averaging
    rows: np.ndarray  # store rows
    seconds: float
    members: np.ndarray | None = None  # (N, M): each member's score, for an ensemble

    @property
    def spread(self) -> np.ndarray | None:
        """The std over an ensemble's members per object (None for a single run)."""
        return member_spread(self.members)


def _concatenated(parts: list[np.ndarray | None]) -> np.ndarray | None:
    return np.concatenate(parts) if parts and parts[0] is not None else None


def predict_rows(
    run: Any, store: Any, rows: np.ndarray, tta: str | None, batch_size: int = PREDICT_BATCH, desc: str = "predict"
) -> Scored:
    """``predict_scored`` over the store's ``rows``, read ``batch_size`` at a time (one read per row for
    every member of an ensemble), with a progress bar."""
    parts: list[Scored] = []
    with progress(len(rows), desc, "img") as bar:
        for first in range(0, len(rows), batch_size):
            batch = rows[first : first + batch_size]
            parts.append(predict_scored(run, store.read(batch), tta, batch_size=batch_size))
            bar.update(len(batch))
    if not parts:
        return Scored(np.empty(0), None)
    return Scored(
        np.concatenate([p.scores for p in parts]),
        _concatenated([p.per_transform for p in parts]),
        _concatenated([p.members for p in parts]),
    )


def predict_split(
    run: Any, store: Any, split: str = "test", tta: str | None = None, batch_size: int = PREDICT_BATCH
) -> SplitPredictions:
    """The run's (or ensemble's) scores for every labelled object of the store's split, read in batches."""
    rows = np.sort(np.concatenate([store.indices(split, label=1), store.indices(split, label=0)]))
    if rows.size == 0:
        raise EvaluateError(f"{store.url}: the {split} split holds no labelled objects")
    started = time.perf_counter()
    scored = predict_rows(run, store, rows, tta, batch_size, f"predict {split}")
    return SplitPredictions(
        ids=store.ids[rows],
        labels=store.labels[rows].astype(np.int8),
        scores=scored.scores,
        per_transform=scored.per_transform,
        rows=rows,
        seconds=time.perf_counter() - started,
        members=scored.members,
    )


# --- what a checkpoint's network takes, with its survey profile -----------------------------------------


def checkpoint_input(
    checkpoint_url: str, run_config: Any | None = None, profile: SurveyProfile | None = None
) -> tuple[ModelInput, SurveyProfile]:
    """``(runs.model_input, the survey profile of its training store)``: a run scores cutouts of the layout
    it was trained on without being told again (the profile rides in the store's recorded transform; a
    store that recorded none is ``euclid_challenge``). ``profile``, when given (``--profile``), must be
    that one: scoring hsc cutouts with a challenge network is an error naming both.
    """
    from lensray.runs import model_input

    taken = model_input(checkpoint_url, run_config)
    if profile is not None and profile != taken.profile:
        trained = taken.profile
        raise ScoreError(
            f"{checkpoint_url} was trained on profile {trained.name} ({', '.join(trained.band_names)}), "
            f"not the requested profile {profile.name} ({', '.join(profile.band_names)}): leave --profile out "
            "or score with a network trained on that layout"
        )
    return taken, taken.profile
