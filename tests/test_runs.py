"""runs.py reads searches through lensray's own JSON/YAML (and Tune's plain JSON/text), never a pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from lensray import storage
from lensray.errors import SearchError
from lensray.runs import load_best, summarise_experiment


class _Payload:
    """Unpickling this creates ``marker``: proof that a reader executed code from the folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _poisoned_copy(experiment_url: str, folder: Path, marker: Path) -> Path:
    """A local copy of the experiment whose every pickle, and Ray's experiment state, runs the payload."""
    fs, path = storage.filesystem(experiment_url)
    fs.get(path, str(folder), recursive=True)
    blob = pickle.dumps(_Payload(marker))
    poisoned = 0
    for file in folder.rglob("*"):
        if file.suffix == ".pkl":
            file.write_bytes(blob)
            poisoned += 1
        elif file.name.startswith("experiment_state") and file.suffix == ".json":
            file.write_text(json.dumps({"_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}))
            poisoned += 1
    assert poisoned >= 2, "the copy must hold Ray's experiment state and pickles to poison"
    return folder


def test_load_best_runs_no_code_from_a_poisoned_experiment(tune_search: Any, tmp_path: Path) -> None:
    from ray.tune import ExperimentAnalysis

    marker = tmp_path / "pwned"
    copy = _poisoned_copy(tune_search.experiment_url, tmp_path / "experiment", marker)
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises after it ran the payload
        ExperimentAnalysis(str(copy))
    assert marker.exists(), "the poison is live: Ray's own reader executes it"
    marker.unlink()

    run = load_best(str(copy))
    original = load_best(tune_search.experiment_url)
    assert not marker.exists(), "lensray's reader must not unpickle anything from the folder"
    assert run.info["trial_id"] == original.info["trial_id"] and run.info["value"] == original.info["value"]
    assert run.checkpoint_url.startswith(str(copy))


def test_summary_of_a_copied_experiment_matches_the_original(tune_search: Any, tmp_path: Path) -> None:
    fs, path = storage.filesystem(tune_search.experiment_url)
    fs.get(path, str(tmp_path / "copy"), recursive=True)
    copied = summarise_experiment(str(tmp_path / "copy"))
    original = tune_search.summary
    columns = ["trial_id", "status", "optim.lr", "epochs", "best_val_auc", "best_epoch", "stopped_by_asha"]
    assert copied.table[columns].equals(original.table[columns])
    assert copied.curves.drop(columns="time_total_s").equals(original.curves.drop(columns="time_total_s"))
    assert all(url.startswith(str(tmp_path / "copy")) for url in copied.table["run_url"])


def test_a_folder_that_is_no_search_is_named(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match=rf"no lensray search at {tmp_path}"):
        summarise_experiment(str(tmp_path))
