"""runs.py reads searches through lensray's own JSON/YAML (and Tune's plain JSON/text), never a pickle, and
checkpoints through torch's weights-only loader: a bad file is a CheckpointError naming it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lensray import storage
from lensray.errors import CheckpointError, SearchError
from lensray.runs import best_checkpoint, load_best, load_run, summarise_experiment


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


def _checkpoint(folder: Path, state: bytes | None = None) -> Path:
    """A checkpoint folder with a fresh LASTRO net's weights for 2 x 32 x 32 inputs, or ``state`` as state.pt."""
    import io

    import torch

    from lensray.config import LensrayConfig, dump_config
    from lensray.models import build_model

    folder.mkdir(parents=True)
    config = LensrayConfig()
    (folder / "config.yaml").write_text(dump_config(config))
    (folder / "model_input.json").write_text(json.dumps({"channels": 2, "size": 32}))
    if state is None:
        buffer = io.BytesIO()
        torch.save({"model": build_model(config.model, 2, 32).state_dict(), "history": [], "epoch": 1}, buffer)
        state = buffer.getvalue()
    (folder / "state.pt").write_bytes(state)
    return folder


def test_load_run_of_a_good_checkpoint(tmp_path: Path) -> None:
    run = load_run(str(_checkpoint(tmp_path / "good")))
    assert run.epoch == 1 and run.predict(np.zeros((2, 2, 32, 32), np.float32)).shape == (2,)


def test_an_unusable_state_is_a_checkpoint_error_naming_it_that_runs_nothing(tmp_path: Path) -> None:
    import io

    import torch

    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"model": _Payload(marker), "history": [], "epoch": 1}, buffer)
    good = (_checkpoint(tmp_path / "good") / "state.pt").read_bytes()
    plain = io.BytesIO()
    torch.save({"weights": torch.zeros(2)}, plain)
    states = {
        "malicious": buffer.getvalue(),
        "corrupt": b"\x00" * 64,
        "truncated": good[: len(good) // 3],
        "empty": b"",
        "not a lensray state": plain.getvalue(),
    }
    for kind, state in states.items():
        folder = _checkpoint(tmp_path / kind.replace(" ", "-"), state)
        with pytest.raises(CheckpointError) as caught:
            load_run(str(folder))
        message = str(caught.value)
        assert str(folder / "state.pt") in message and "weights_only" not in message, (kind, message)
        chained = caught.value.__cause__ or (None if caught.value.__suppress_context__ else caught.value.__context__)
        assert chained is None, kind  # -v prints the chain: torch's text must not be in it
    assert not marker.exists(), "a checkpoint ran code"


def test_weights_that_do_not_fit_and_corrupt_json_name_the_file(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "other-net")
    (folder / "model_input.json").write_text(json.dumps({"channels": 3, "size": 32}))
    with pytest.raises(CheckpointError, match=rf"{folder}: the weights do not fit"):
        load_run(str(folder))
    (folder / "model_input.json").write_text('{"channels": 2, "si')
    with pytest.raises(CheckpointError, match=rf"{folder / 'model_input.json'} is not valid JSON"):
        load_run(str(folder))
    (folder / "model_input.json").write_text(json.dumps({"channels": 2, "size": 32}))
    (folder / "config.yaml").write_text("train:\n  epochs: [\n")
    with pytest.raises(CheckpointError, match=rf"{folder / 'config.yaml'}: not valid YAML"):
        load_run(str(folder))
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.json").write_text('[{"epoch": 1, "val_auc"')
    with pytest.raises(CheckpointError, match=rf"{run / 'history.json'} is not valid JSON"):
        best_checkpoint(str(run))
