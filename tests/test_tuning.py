"""Ray Tune search: YAML search spaces and their errors, an ASHA search on S3, load_best, resume."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ray.tune import Callback

from lensray import storage
from lensray.config import ConfigError, config_from_dict
from lensray.train.trainer import best_checkpoint
from lensray.train.tune import (
    ASHA_STOPS_FILE,
    BEST_CONFIG_FILE,
    TRIAL_RUN,
    TUNE_CONFIG_FILE,
    SearchError,
    load_tune_config,
    parse_dimension,
    run_tune,
    tune_spec_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
# The shipped searches, and the demo's, which ships inside the package (lensray/resources).
TUNE_CONFIGS = [*sorted((REPO / "tune_configs").glob("*.yaml")), REPO / "lensray" / "resources" / "demo_search.yaml"]


# --- the YAML ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_every_tune_config_loads_validates_and_round_trips(path: Path) -> None:
    spec = load_tune_config(path)
    assert spec.space and spec.search.name and spec.search.metric == "val_auc"
    assert set(spec.param_space()) == set(spec.space)
    again = tune_spec_from_dict(yaml.safe_load(spec.dump()), "dumped")
    assert again.run == spec.run and again.space == spec.space


def test_the_required_tune_configs_exist() -> None:
    names = {p.name for p in TUNE_CONFIGS}
    assert {"lastro_kernels_pools.yaml", "resnet_depth.yaml", "model_choice.yaml", "demo_search.yaml"} <= names
    assert load_tune_config(REPO / "tune_configs" / "model_choice.yaml").space["model.name"].values == (
        "lastro",
        "resnet",
    )


def test_overrides_and_trial_configs() -> None:
    spec = load_tune_config(
        REPO / "tune_configs" / "lastro_kernels_pools.yaml",
        ["search.num_samples=3", "data.store=rel/store.zarr", "search.storage=s3://b/exp"],
    )
    assert spec.search.num_samples == 3 and spec.experiment_url() == "s3://b/exp/lastro-kernels-pools"
    assert spec.run.data.store == str(Path("rel/store.zarr").resolve()), (
        "trials run elsewhere: local paths are made absolute"
    )
    trial = spec.trial_config({"model.lastro.first_kernel": 7, "optim.lr": 1e-3}, out="/x", name="t")
    assert (trial.model.lastro.first_kernel, trial.optim.lr, trial.train.out, trial.train.name) == (7, 1e-3, "/x", "t")
    assert trial.model.lastro.pool == spec.run.model.lastro.pool


def test_distributions_sample_inside_their_declared_ranges() -> None:
    rng = np.random.default_rng(0)
    randint = parse_dimension("model.lastro.kernel", {"randint": [3, 5]}, "t")
    samples = {randint.to_tune().sample(random_state=rng) for _ in range(200)}
    assert samples == {3, 4, 5}, "randint includes both ends"
    lr = parse_dimension("optim.lr", {"loguniform": [1.0e-4, 1.0e-2]}, "t")
    values = np.array([lr.to_tune().sample(random_state=rng) for _ in range(500)])
    assert values.min() >= 1e-4 and values.max() <= 1e-2 and np.mean(values < 1e-3) == pytest.approx(0.5, abs=0.1)
    dropout = parse_dimension("model.lastro.dropout", {"uniform": [0.1, 0.3]}, "t")
    assert dropout.reachable_values() == [0.1, pytest.approx(0.2), 0.3]
    assert parse_dimension("model.name", {"grid": ["lastro", "resnet"]}, "t").to_tune() == {
        "grid_search": ["lastro", "resnet"]
    }


def _with(**changes: Any) -> dict[str, Any]:
    tree = {"base": str(REPO / "configs" / "lastro.yaml"), "space": {"optim.lr": {"choice": [1.0e-3]}}}
    for key, value in changes.items():
        if key == "space_entry":
            tree["space"] = dict([value])
        else:
            tree[key] = value
    return tree


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (_with(searc={"num_samples": 2}), r"unknown top-level key\(s\) \['searc'\]"),
        (_with(space_entry=("optim.lr", {"normal": [0, 1]})), r"space\.optim\.lr: unknown distribution 'normal'"),
        (_with(space_entry=("optim.lr", {"uniform": [1.0e-3, 1.0e-4]})), r"space\.optim\.lr: uniform needs low < high"),
        (_with(space_entry=("optim.lr", {"loguniform": [0.0, 1.0e-3]})), r"space\.optim\.lr: loguniform needs low > 0"),
        (_with(space_entry=("optim.lr", {"uniform": ["1e-4", 1.0e-3]})), r"space\.optim\.lr: .*write 1\.0e-4"),
        (
            _with(space_entry=("model.lastro.kernel", {"randint": [3, 5.5]})),
            r"space\.model\.lastro\.kernel: randint takes two integers",
        ),
        (
            _with(space_entry=("model.lastro.pool", {"choice": []})),
            r"space\.model\.lastro\.pool: choice needs at least one value",
        ),
        (
            _with(space_entry=("model.lastro.pool", [2, 3])),
            r"space\.model\.lastro\.pool: must be a mapping with one distribution",
        ),
        (
            _with(space_entry=("model.lastro.pool", {"choice": [2], "grid": [3]})),
            r"space\.model\.lastro\.pool: must be a mapping",
        ),
        (
            _with(space_entry=("model.lastro.kernal", {"choice": [3]})),
            r"space\.model\.lastro\.kernal: model\.lastro\.kernal is not a config key",
        ),
        (
            _with(space_entry=("optim.lr.max", {"choice": [3]})),
            r"space\.optim\.lr\.max: optim\.lr is a value, not a section",
        ),
        (_with(space_entry=("train.out", {"choice": ["/a"]})), r"space\.train\.out: cannot be searched"),
        (_with(space_entry=("preprocess.crop", {"choice": [50]})), r"space\.preprocess\.crop: cannot be searched"),
        (
            _with(space_entry=("resources.num_workers", {"choice": [2]})),
            r"space\.resources\.num_workers: cannot be searched",
        ),
        (
            _with(space_entry=("model.name", {"choice": ["lastro", "vgg"]})),
            r"space\.model\.name: a sample of 'vgg' gives an invalid run config",
        ),
        (
            _with(space_entry=("model.lastro.dropout", {"uniform": [0.0, 1.0]})),
            r"space\.model\.lastro\.dropout: a sample of 1\.0 gives",
        ),
        (
            _with(space_entry=("model.lastro.first_kernel", {"uniform": [3, 6]})),
            r"space\.model\.lastro\.first_kernel: a sample of 4\.5 gives",
        ),
        (_with(space_entry=("optim.lr", {"grid": [1.0e-3, -1.0]})), r"space\.optim\.lr: a sample of -1\.0 gives"),
        (_with(space={}), r"space must map at least one config key"),
        (_with(search={"metric": "val_f1"}), r"search\.metric 'val_f1' is not reported"),
        (_with(search={"reduction_factor": 1}), r"search\.reduction_factor"),
        (_with(run={"optim": {"lrr": 1}}), r"optim\.lrr: unknown key"),
        (_with(base="missing.yaml"), r"base: no run config at"),
    ],
)
def test_invalid_tune_configs_name_the_key(tree: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tune_spec_from_dict(tree, "t.yaml", REPO)


def test_a_missing_file_and_nothing_to_resume(tmp_path: Path, tiny_search_tree: Any) -> None:
    with pytest.raises(ConfigError, match="no tune config at"):
        load_tune_config(tmp_path / "nope.yaml")
    spec = tune_spec_from_dict(tiny_search_tree(str(tmp_path), "never-ran"), "t")
    with pytest.raises(SearchError, match="nothing to resume"):
        run_tune(spec, resume=True)


def test_a_net_too_deep_for_the_store_fails_before_any_trial(tmp_path: Path, tiny_search_tree: Any) -> None:
    tree = tiny_search_tree(str(tmp_path), "deep")
    tree["space"] = {"model.lastro.pool": {"choice": [2, 4]}}  # 32 px -> 8 -> 2 -> 0 with pool 4
    with pytest.raises(SearchError, match=r"space\.model\.lastro\.pool=4 on 2x32x32 images"):
        run_tune(tune_spec_from_dict(tree, "t"))
    assert not (tmp_path / "deep").exists()


# --- a search on S3 (conftest's tune_search) ---------------------------------------------------------


def test_asha_stops_the_trailing_trial_and_leaks_no_placement_group(tune_search: Any) -> None:
    import ray

    table = tune_search.summary.table.set_index("optim.lr")
    epochs = tune_search.best_config.train.epochs
    assert list(table["status"]) == ["TERMINATED", "TERMINATED"]
    assert table.loc[3e-3, "epochs"] == epochs > 2 and not table.loc[3e-3, "stopped_by_asha"]
    assert table.loc[1e-7, "epochs"] == 2 and table.loc[1e-7, "stopped_by_asha"], "ASHA stops at the grace period"
    assert tune_search.stopped_early == 1 and len(tune_search.start_overheads_s) == 2
    stops = json.loads(storage.read_bytes(storage.join(tune_search.experiment_url, ASHA_STOPS_FILE)))
    assert list(stops) == [table.loc[1e-7, "trial_id"]]
    deadline = time.time() + 20  # finished trials' placement groups are removed asynchronously
    while time.time() < deadline:
        live = [pg for pg in ray.util.placement_group_table().values() if pg["state"] in ("CREATED", "PENDING")]
        if not live:
            break
        time.sleep(1)
    assert not live, f"placement groups left behind: {live}"


def test_everything_lives_under_the_experiment_folder(tune_search: Any) -> None:
    experiment = tune_search.experiment_url
    best_url = storage.join(experiment, BEST_CONFIG_FILE)
    best = config_from_dict(yaml.safe_load(storage.read_bytes(best_url)), best_url)
    assert best == tune_search.best_config and best.optim.lr == 3e-3
    assert best.train.out is None and best.train.name is None, "ready for `lensray train --config`"
    saved = tune_spec_from_dict(yaml.safe_load(storage.read_bytes(storage.join(experiment, TUNE_CONFIG_FILE))), "saved")
    assert saved.space["optim.lr"].values == (3e-3, 1e-7)
    for run_url in tune_search.summary.table["run_url"]:
        assert run_url.startswith(experiment + "/trial_") and run_url.endswith("/" + TRIAL_RUN)
        history = json.loads(storage.read_bytes(storage.join(run_url, "history.json")))
        assert history and history[-1]["epoch"] <= best.train.epochs
        fs, path = storage.filesystem(storage.join(run_url, "tensorboard"))
        assert fs.ls(path), "each trial's TensorBoard logs sit under the experiment"


def test_load_best_picks_tunes_best_trial_and_reproduces_its_predictions(tune_search: Any, tiny_store: str) -> None:
    from ray.tune import ExperimentAnalysis

    import lensray
    from lensray.ingest.store import LensStore

    experiment = tune_search.experiment_url
    fs = storage.arrow_filesystem(experiment)[0]
    tune_best = ExperimentAnalysis(storage.strip_scheme(experiment), storage_filesystem=fs).get_best_trial(
        "val_auc", "max", scope="all"
    )

    run = lensray.load_best(experiment)
    assert run.info["trial_id"] == tune_best.trial_id
    assert run.info["value"] == tune_best.metric_analysis["val_auc"]["max"]
    assert run.config.optim.lr == tune_best.config["optim.lr"] == run.info["params"]["optim.lr"]
    assert run.checkpoint_url.startswith(run.info["run_url"] + "/checkpoint_")
    # The same lookup as `train` and `evaluate` on a run folder. Not always Tune's best_epoch: with
    # several epochs at the best value, keep-N may have dropped the earliest one's checkpoint.
    best = best_checkpoint(run.info["run_url"])
    assert run.checkpoint_url == best.url and run.epoch == best.metrics["epoch"]
    assert best.metrics["val_auc"] == run.info["value"] and best.best_epoch == run.info["best_epoch"]
    assert len(run.info["results"]) == 2 and set(run.info["curves"]["trial_id"]) == set(run.info["results"]["trial_id"])

    stored = run.val_predictions()
    store = LensStore.open(tiny_store)
    rows = np.searchsorted(store.ids, stored["ids"])
    np.testing.assert_allclose(run.predict(store.read(rows)), stored["scores"], rtol=1e-5, atol=1e-6)


def test_a_second_search_of_the_same_name_is_refused(tune_search: Any, tiny_search_tree: Any) -> None:
    root, name = tune_search.experiment_url.rsplit("/", 1)
    with pytest.raises(SearchError, match="already exists: pass --resume"):
        run_tune(tune_spec_from_dict(tiny_search_tree(root, name), "again"))


# --- resume -------------------------------------------------------------------------------------


class InterruptAfter(Callback):
    """Sends this process SIGUSR1, which Tune handles like Ctrl-C, once a trial reports ``epoch``.

    Once only: a restored search brings its callbacks back, so the flag lives in a file."""

    def __init__(self, epoch: int, flag: Path) -> None:
        self.epoch, self.flag = epoch, flag

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not self.flag.exists() and result.get("epoch", 0) >= self.epoch:
            self.flag.touch()
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_an_interrupted_search_resumes_its_trials(
    tmp_path: Path,
    tiny_search_tree: Any,
    ray_cluster: None,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Longer epochs (~1 s), so the first trial is mid-run when the interruption stops it.
    tree = tiny_search_tree(str(tmp_path / "experiments"), "resumed", steps_per_epoch=64)
    with caplog.at_level(logging.INFO, logger="lensray"):  # lensray's console without -v
        first = run_tune(tune_spec_from_dict(tree, "t"), callbacks=[InterruptAfter(1, tmp_path / "interrupted")])
    lines = [r.getMessage() for r in caplog.records if r.name == "lensray.train.tune"]
    assert any(re.match(r"trial \w+ \(optim\.lr=0\.003\) epoch 1/4: val_auc \d", line) for line in lines), lines
    assert "== Status ==" not in capsys.readouterr().out, "Tune's status tables only under -v"
    print(first)
    # One trial at a time: the second is not even sampled yet.
    assert first.trials == 1 and first.summary.unfinished == 1 and first.best_config is not None
    before = first.summary.curves.groupby("trial_id")["epoch"].max().to_dict()
    assert list(before.values()) == [1], "interrupted after the first epoch"

    with pytest.raises(SearchError, match="already exists"):
        run_tune(tune_spec_from_dict(tree, "t"))
    # The file may have changed since: a resume reruns the saved search.
    changed = {**tree, "space": {"optim.lr": {"grid": [1.0e-2]}}}
    resumed = run_tune(tune_spec_from_dict(changed, "t"), resume=True)
    print(resumed)
    table = resumed.summary.table.set_index("trial_id")
    assert set(first.summary.table["trial_id"]) < set(table.index) and len(table) == 2, "the same search, continued"
    assert list(table["status"]) == ["TERMINATED", "TERMINATED"] and resumed.summary.unfinished == 0
    first_trial, epochs = next(iter(before)), resumed.best_config.train.epochs
    reported = resumed.summary.curves.query("trial_id == @first_trial")["epoch"].tolist()
    assert reported[0] == 1 and reported == sorted(set(reported)) and reported[-1] == epochs, (
        f"the first trial must continue from its checkpoint, not start again: epochs reported {reported}"
    )
    run_url = table.loc[first_trial, "run_url"]
    history = json.loads(storage.read_bytes(storage.join(run_url, "history.json")))
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    assert history[-1]["resumed_from"] >= 1, "the restarted trial continues from its latest complete checkpoint"
    folders = [name for name in storage.list_folders(run_url) if name.startswith("checkpoint_")]
    assert len(folders) <= resumed.best_config.train.num_to_keep, folders
    assert resumed.best_config is not None and (tmp_path / "experiments" / "resumed" / BEST_CONFIG_FILE).exists()
