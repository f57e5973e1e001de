"""Ensembles of trained runs: the members' lens probabilities averaged, their spread as an uncertainty.

An ensemble is a list of runs (run folders stand for their best checkpoint, as everywhere) or the top K
trials of a search (``lensray tune``), ranked by the search metric and read through lensray's own files,
never Ray's pickled experiment state (``runs.summarise_experiment``). Every member must take the same
input: the same bands and the same store transform (``model_input.json``), so that one read and one
preprocessing of a cutout serve every member. A mismatch is an error naming the members and the key.

The ensemble's score is the mean of the members' probabilities, each member with its own D4 averaging
when asked (``inference.predict_tta``), and ``score_std`` is the standard deviation over the members of
those scores (numpy's population std, ``ddof=0``): 0 when every member agrees. Averaging probabilities,
not logits, keeps the ensemble's score the mean of what its networks say (HOLISMOKES, Euclid Q1 and DES
combine networks the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lensray import storage
from lensray.errors import CheckpointError, EvaluateError, SearchError
from lensray.evaluate.inference import Scored, predict_tta
from lensray.runs import (
    MODEL_INPUT_FILE,
    TRIAL_PREFIX,
    TRIAL_RUN,
    Run,
    best_checkpoint,
    load_run,
    read_json,
    resolve_checkpoint,
    summarise_experiment,
)

MIN_MEMBERS = 2


@dataclass(frozen=True)
class Member:
    name: str  # the run folder's name, or the search trial's ID
    checkpoint: str  # the checkpoint folder scored


@dataclass(frozen=True)
class EnsembleSpec:
    """The members of an ensemble (checked to share their input) and where they came from."""

    members: tuple[Member, ...]
    source: str  # "runs", or "<experiment> top K by <metric>"
    bands: tuple[str, ...]
    transform: dict[str, Any]  # the members' shared store transform (model_input.json)
    store: str | None  # the members' training store when they all share one, else None

    @property
    def checkpoints(self) -> tuple[str, ...]:
        return tuple(member.checkpoint for member in self.members)

    @property
    def label(self) -> str:
        """How reports name the ensemble."""
        return f"ensemble of {len(self.members)} ({', '.join(m.name for m in self.members)})"


def member_name(checkpoint: str) -> str:
    """The run folder's name; a search trial's run (``trial_<id>/train``) is named by its trial ID."""
    parts = checkpoint.rstrip("/").split("/")
    run = parts[-2] if len(parts) >= 2 else parts[-1]
    if run == TRIAL_RUN and len(parts) >= 3 and parts[-3].startswith(TRIAL_PREFIX):
        return parts[-3].removeprefix(TRIAL_PREFIX)
    return run


def _unique_names(names: Sequence[str]) -> list[str]:
    """Names as given, a repeated one suffixed with its position (two runs of the same folder name)."""
    return [f"{name}#{k + 1}" if names.count(name) > 1 else name for k, name in enumerate(names)]


def _input_record(checkpoint: str) -> dict[str, Any]:
    url = storage.join(checkpoint, MODEL_INPUT_FILE)
    try:
        return read_json(url, dict)
    except FileNotFoundError:
        raise CheckpointError(f"{url} is missing: {checkpoint} is not a lensray checkpoint folder") from None


def check_shared_input(members: Sequence[Member]) -> tuple[tuple[str, ...], dict[str, Any], str | None]:
    """``(bands, transform, store or None)`` shared by every member; EvaluateError naming the first member
    that differs from the first one, and every differing key, otherwise."""
    if len(members) < MIN_MEMBERS:
        raise EvaluateError(f"an ensemble needs at least {MIN_MEMBERS} members, got {len(members)}")
    records = [_input_record(m.checkpoint) for m in members]
    first, reference = members[0], records[0]
    for member, record in zip(members[1:], records[1:], strict=True):
        differing = []
        for key in ("bands", "channels", "size"):
            if record.get(key) != reference.get(key):
                differing.append(f"{key}: {reference.get(key)!r} vs {record.get(key)!r}")
        theirs, ours = record.get("transform") or {}, reference.get("transform") or {}
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key) != ours.get(key):
                differing.append(f"transform {key}: {ours.get(key)!r} vs {theirs.get(key)!r}")
        if differing:
            raise EvaluateError(
                f"ensemble members {first.name} ({first.checkpoint}) and {member.name} ({member.checkpoint}) "
                f"take different inputs ({'; '.join(differing)}): members must share bands and the store's "
                "preprocessing"
            )
    stores = {record.get("store") for record in records}
    return (
        tuple(reference.get("bands") or ()),
        dict(reference.get("transform") or {}),
        (stores.pop() if len(stores) == 1 else None),
    )


def _spec(members: list[Member], source: str) -> EnsembleSpec:
    bands, transform, store = check_shared_input(members)
    return EnsembleSpec(members=tuple(members), source=source, bands=bands, transform=transform, store=store)


def ensemble_from_runs(urls: Sequence[str], names: Sequence[str] | None = None) -> EnsembleSpec:
    """An ensemble of run folders (each its best checkpoint) or checkpoint folders."""
    checkpoints = [resolve_checkpoint(url) for url in urls]
    if names is not None and len(names) != len(checkpoints):
        raise EvaluateError(f"{len(names)} names for {len(checkpoints)} ensemble members")
    named = _unique_names(list(names) if names is not None else [member_name(c) for c in checkpoints])
    return _spec([Member(n, c) for n, c in zip(named, checkpoints, strict=True)], "runs")


def ensemble_from_search(experiment_url: str, top: int, metric: str = "val_auc", mode: str = "max") -> EnsembleSpec:
    """The ``top`` trials of a search by their best ``metric`` (``summarise_experiment``'s ranking), each
    its best kept checkpoint (``best_checkpoint``). SearchError when fewer trials reported the metric."""
    if top < MIN_MEMBERS:
        raise SearchError(f"--top must be at least {MIN_MEMBERS} for an ensemble, got {top}")
    summary = summarise_experiment(experiment_url, metric, mode)
    table = summary.table
    ranked = table[table[f"best_{metric}"].notna()] if len(table) else table
    if len(ranked) < top:
        raise SearchError(
            f"{summary.experiment_url}: {len(ranked)} trial(s) reported {metric}, the ensemble asks for the top {top}"
        )
    members = []
    for row in ranked.head(top).itertuples():
        try:
            checkpoint = best_checkpoint(row.run_url, metric, mode).url
        except CheckpointError as exc:
            raise SearchError(f"{summary.experiment_url}: trial {row.trial_id}: {exc}") from exc
        members.append(Member(str(row.trial_id), checkpoint))
    return _spec(members, f"{summary.experiment_url} top {top} by {metric}")


def resolve_ensemble(
    runs: Sequence[str] | None = None, search: str | None = None, top: int | None = None
) -> EnsembleSpec | None:
    """The CLI's choice: ``--runs A B C`` or ``--from-search EXP --top K``; None when neither was given."""
    if runs and search:
        raise EvaluateError("give the ensemble's members either as --runs or with --from-search, not both")
    if top is not None and not search:
        raise EvaluateError("--top goes with --from-search EXPERIMENT")
    if search:
        return ensemble_from_search(search, 3 if top is None else top)
    return ensemble_from_runs(runs) if runs else None


# --- a loaded ensemble ------------------------------------------------------------------------------


@dataclass
class Ensemble:
    """The members' networks in eval mode; ``predict``/``predict_members`` stand in for ``runs.Run``'s."""

    spec: EnsembleSpec
    runs: list[Run]

    @property
    def members(self) -> tuple[Member, ...]:
        return self.spec.members

    @property
    def config(self) -> Any:
        """The first member's run config: the data settings (NaN policy, bands) every member shares."""
        return self.runs[0].config

    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """The mean of the members' lens probabilities for (N, C, H, W) preprocessed images."""
        return np.mean([run.predict(images, batch_size=batch_size) for run in self.runs], axis=0)

    def predict_members(self, images: np.ndarray | torch.Tensor, tta: str | None, batch_size: int = 256) -> Scored:
        """Every member's score (each with its own D4 averaging under ``tta``), their mean, and the mean
        over members of each D4 view; the spread (``Scored.spread``) is the std over members."""
        per_member, views = [], []
        for run in self.runs:
            mean, per = predict_tta(run, images, tta, batch_size=batch_size)
            per_member.append(mean)
            if per is not None:
                views.append(per)
        members = np.stack(per_member, axis=1)
        return Scored(members.mean(axis=1), np.mean(views, axis=0) if views else None, members)

    def val_predictions(self) -> dict[str, np.ndarray]:
        """The members' stored validation predictions averaged, when they are of the same objects."""
        stored = [run.val_predictions() for run in self.runs]
        order = [np.argsort(p["ids"], kind="stable") for p in stored]
        ids, labels = stored[0]["ids"][order[0]], stored[0]["labels"][order[0]]
        for member, p, o in zip(self.members[1:], stored[1:], order[1:], strict=True):
            if not (np.array_equal(p["ids"][o], ids) and np.array_equal(p["labels"][o], labels)):
                raise EvaluateError(
                    f"ensemble members {self.members[0].name} and {member.name} were validated on different "
                    "objects: the ensemble has no validation predictions to choose its threshold on"
                )
        scores = np.mean([p["scores"][o] for p, o in zip(stored, order, strict=True)], axis=0)
        return {"ids": ids, "labels": labels, "scores": scores}


def load_ensemble(spec: EnsembleSpec, device: str | torch.device = "cpu") -> Ensemble:
    return Ensemble(spec=spec, runs=[load_run(member.checkpoint, device) for member in spec.members])


def load_model(model: str | EnsembleSpec, device: str | torch.device = "cpu") -> Run | Ensemble:
    """A checkpoint or run folder as a ``Run``; an ``EnsembleSpec`` as an ``Ensemble``."""
    return load_ensemble(model, device) if isinstance(model, EnsembleSpec) else load_run(model, device)
