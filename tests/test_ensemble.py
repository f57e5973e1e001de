"""Ensembles: two tiny real runs on one store of simulated FITS; the ensemble's score is the members' mean
and ``score_std`` their spread (scoring raw cutouts, with each member's own D4 averaging); members with
different inputs are refused naming both; evaluate and compare take an ensemble like a run; a search's
top trials make an ensemble."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_run import tiny_run_config

from lensray import storage
from lensray.cli import main
from lensray.config import DataConfig, PreprocessConfig, SimulateConfig
from lensray.errors import EvaluateError, SearchError
from lensray.evaluate import metrics
from lensray.evaluate.compare import compare_runs
from lensray.evaluate.ensemble import ensemble_from_runs, ensemble_from_search
from lensray.evaluate.evaluate import evaluate_run
from lensray.evaluate.inference import predict_tta
from lensray.evaluate.score import score_catalog
from lensray.ingest.ingest import ingest
from lensray.ingest.store import LensStore
from lensray.runs import MODEL_INPUT_FILE, load_run
from lensray.simulate.writer import simulate_dataset
from lensray.sky.catalog import CATALOG_NAME
from lensray.train.trainer import train

N = 40


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> tuple[str, str, list[str]]:
    """``(raw root, store, [run folder A, run folder B])``: two one-epoch runs (other seeds, other
    learning rates) on one store ingested from simulated FITS, with lenses and non-lenses in val and test."""
    folder = tmp_path_factory.mktemp("ensemble")
    raw = str(folder / "raw")
    simulate_dataset(
        SimulateConfig(
            out=raw,
            n=N,
            seed=5,
            nan_pixel_rate=0.0,
            offsize_nir_rate=0.0,
            missing_image_rate=0.0,
            duplicate_id_rate=0.0,
            workers=2,
        )
    )
    store_url = str(folder / "store.zarr")
    data = DataConfig(images=raw, catalog=storage.join(raw, CATALOG_NAME), bands=("VIS", "J"), labels="paper")
    preprocess = PreprocessConfig(out=store_url, crop=40, bin=2, shard_size=8, val_fraction=0.3, test_fraction=0.3)
    ingest(data, preprocess, progress=False)
    store = LensStore.open(store_url)
    for split in ("val", "test"):
        assert len(set(store.labels[store.indices(split)].tolist())) == 2, f"the fixture needs both classes in {split}"
    runs = []
    for name, seed, lr in (("ens-a", 1, 1e-3), ("ens-b", 2, 3e-3)):
        config = tiny_run_config(store_url, folder / "runs", name)
        config = config.model_copy(
            update={
                "train": config.train.model_copy(update={"seed": seed}),
                "optim": config.optim.model_copy(update={"lr": lr}),
            }
        )
        runs.append(train(config).run_url)
    return raw, store_url, runs


def _member_scores(runs: list[str], images: np.ndarray, tta: str | None) -> np.ndarray:
    """(N, members): each member's own score of the images, as a single run scores them."""
    return np.stack([predict_tta(load_run(url), images, tta)[0] for url in runs], axis=1)


def test_ensemble_score_is_the_members_mean_and_score_std_their_spread(
    members: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    raw, store_url, runs = members
    out = str(tmp_path / "candidates.parquet")
    summary = score_catalog(
        ensemble_from_runs(runs), raw, storage.join(raw, CATALOG_NAME), out, tta="d4", device="cpu", gallery=4
    )
    candidates = pd.read_parquet(io.BytesIO(storage.read_bytes(out)))
    assert list(candidates.columns[:4]) == ["rank", "id", "score", "score_std"]
    assert {f"score_d4_{k}" for k in range(8)} <= set(candidates.columns)
    assert len(candidates) == N and (np.diff(candidates["score"]) <= 0).all()

    # Raw FITS -> the members' shared transform -> each member with its own D4 averaging -> mean and std.
    store = LensStore.open(store_url)
    each = _member_scores(runs, store.read(np.searchsorted(store.ids, candidates["id"].to_numpy())), "d4")
    assert np.abs(each[:, 0] - each[:, 1]).max() > 1e-4, "the two members must disagree somewhere"
    np.testing.assert_allclose(candidates["score"], each.mean(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(candidates["score_std"], each.std(axis=1), rtol=1e-4, atol=1e-7)
    views = candidates[[f"score_d4_{k}" for k in range(8)]].to_numpy()
    np.testing.assert_allclose(views.mean(axis=1), candidates["score"], rtol=1e-6, atol=1e-9)

    saved = json.loads((tmp_path / "candidates_summary.json").read_text())
    assert [m["name"] for m in saved["members"]] == ["ens-a", "ens-b"] and saved["ensemble_source"] == "runs"
    assert "score_std" in saved["top"][0] and "+-" in str(summary)


def test_members_with_different_inputs_are_refused_naming_both(
    members: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    _, _, runs = members
    checkpoint = load_run(runs[1]).checkpoint_url
    for key, value, shown in (("bands", ["VIS", "H"], "bands"), ("crop", 60, "transform crop")):
        other = tmp_path / f"other-{key}" / "checkpoint_000000"
        shutil.copytree(checkpoint, other)
        record = json.loads((other / MODEL_INPUT_FILE).read_text())
        if key == "bands":
            record["bands"] = value
        else:
            record["transform"][key] = value
        (other / MODEL_INPUT_FILE).write_text(json.dumps(record))
        with pytest.raises(EvaluateError, match=shown) as refused:
            ensemble_from_runs([runs[0], str(other)])
        message = str(refused.value)
        assert "ens-a" in message and f"other-{key}" in message and str(other) in message
    with pytest.raises(EvaluateError, match="at least 2 members"):
        ensemble_from_runs(runs[:1])


def test_evaluate_and_compare_an_ensemble(
    members: tuple[str, str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, store_url, runs = members
    spec = ensemble_from_runs(runs)
    report = evaluate_run(spec, store_url, tmp_path / "eval", gallery=2)
    numbers = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    store = LensStore.open(store_url)
    rows = np.sort(np.concatenate([store.indices("test", label=1), store.indices("test", label=0)]))
    each, labels = _member_scores(runs, store.read(rows), None), store.labels[rows]
    assert numbers["metrics"]["auc"] == pytest.approx(metrics.auc(labels, each.mean(axis=1)))
    assert [m["name"] for m in numbers["members"]] == ["ens-a", "ens-b"]
    assert [m["auc"] for m in numbers["members"]] == pytest.approx([metrics.auc(labels, s) for s in each.T])
    assert numbers["mean_score_std"] == pytest.approx(each.std(axis=1).mean())
    assert numbers["epoch"] is None and numbers["model"] == "ensemble of 2"
    assert "score_std" in (tmp_path / "eval" / "predictions.csv").read_text().splitlines()[0]
    assert "ensemble of 2" in str(report) and "ens-b" in (tmp_path / "eval" / "report.html").read_text()

    table = compare_runs([], tmp_path / "compare", ensemble=spec)
    assert [row["name"] for row in table.rows] == ["ensemble", "ens-a", "ens-b"]
    assert [row["auc"] for row in table.rows] == pytest.approx(
        [numbers["metrics"]["auc"], *(m["auc"] for m in numbers["members"])]
    )
    gain = table.comparison.ensemble
    best = max(numbers["members"], key=lambda m: m["auc"])
    assert gain.member == best["name"] and gain.n == len(rows) and gain.resamples > 1000
    assert gain.delta_auc == pytest.approx(numbers["metrics"]["auc"] - best["auc"])
    assert gain.low <= gain.delta_auc <= gain.high
    assert json.loads(Path(table.json_path).read_text())["ensemble"]["member"] == best["name"]

    # The CLI: the same flags as a run's, one line on a refused ensemble.
    assert main(["compare", "--runs", *runs, "--out", str(tmp_path / "cli")]) == 0
    assert "ensemble vs its best member" in capsys.readouterr().out
    assert main(["compare", "--runs", runs[0], "--out", str(tmp_path / "one")]) == 1
    assert "at least 2 members" in capsys.readouterr().err


def test_a_search_top_trials_make_an_ensemble(tune_search) -> None:
    experiment = tune_search.experiment_url
    spec = ensemble_from_search(experiment, top=2)
    from lensray.runs import summarise_experiment

    ranked = summarise_experiment(experiment).table
    assert [m.name for m in spec.members] == ranked["trial_id"].tolist()[:2]
    assert all(m.checkpoint.startswith(experiment) for m in spec.members) and "top 2 by val_auc" in spec.source
    with pytest.raises(SearchError, match="2 trial"):
        ensemble_from_search(experiment, top=3)


def test_ensemble_flags_are_paths_made_absolute_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensray.cli import build_parser, resolve_paths
    from lensray.evaluate.ensemble import resolve_ensemble

    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    for argv in (
        ["score", "--runs", "runs/a", "s3://b/runs/b", "--images", "raw", "--catalog", "c.csv", "--out", "c.parquet"],
        ["evaluate", "--from-search", "exp/search", "--top", "2", "--store", "s.zarr", "--out", "ev"],
        ["compare", "runs/c", "--runs", "runs/a", "runs/b", "--out", "cmp"],
    ):
        args = resolve_paths(parser.parse_args(argv))
        for value in [*(args.members or []), *([args.from_search] if args.from_search else [])]:
            assert value.startswith(("s3://", str(tmp_path))), (argv, value)
    assert parser.parse_args(["compare", "runs/c", "--runs", "runs/a", "runs/b", "--out", "o"]).runs == ["runs/c"]
    with pytest.raises(SystemExit):  # one run or an ensemble, not both
        parser.parse_args(["score", "--run", "r", "--runs", "a", "b", "--out", "o"])
    with pytest.raises(EvaluateError, match="--top goes with --from-search"):
        resolve_ensemble(["a", "b"], None, 3)
    with pytest.raises(SearchError, match="at least 2"):
        resolve_ensemble(None, "exp", 1)
