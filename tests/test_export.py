"""Export and load_model: a run's network as safetensors + model.json, scoring raw FITS or raw arrays in a
notebook (no store, no Ray) to the numbers `lensray score` gives, bad inputs named as score names them,
and nothing in the exported folder that could run code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from tiny_run import tiny_run_config

import lensray
from lensray import storage
from lensray.cli import main
from lensray.config import DataConfig, PreprocessConfig, SimulateConfig
from lensray.errors import CheckpointError, ScoreError
from lensray.evaluate.export import MODEL_FILE, WEIGHTS_FILE, export_model, resolve_source
from lensray.evaluate.score import score_catalog
from lensray.ingest.ingest import ingest
from lensray.runs import load_best, load_run
from lensray.simulate.writer import simulate_dataset
from lensray.sky.catalog import CATALOG_NAME
from lensray.sky.fits import CutoutError, band_url
from lensray.train.trainer import train

N = 12
BANDS = ("VIS", "J")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> tuple[str, str]:
    """``(raw data root, run folder)``: a tiny run on an ingested simulated set (VIS + J, crop 40, bin 2)."""
    folder = tmp_path_factory.mktemp("export")
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
    data = DataConfig(images=raw, catalog=storage.join(raw, CATALOG_NAME), bands=BANDS)
    # split_seed 7 puts both classes in every split of these 12 objects (the evaluation below needs them in test).
    preprocess = PreprocessConfig(
        out=store_url, crop=40, bin=2, shard_size=8, val_fraction=0.3, test_fraction=0.3, split_seed=7
    )
    ingest(data, preprocess, progress=False)
    outcome = train(tiny_run_config(store_url, folder / "runs", "export"))
    return raw, str(Path(outcome.best_checkpoint).parent)


def _ids(raw: str) -> list[int]:
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in (Path(raw) / "EUC_VIS").glob("*.fits"))


def _paths(raw: str, ids: list[int]) -> list[dict[str, str]]:
    return [{band: band_url(raw, object_id, band) for band in BANDS} for object_id in ids]


def test_predict_cutouts_equals_lensray_score_on_the_same_cutouts(trained: tuple[str, str], tmp_path: Path) -> None:
    raw, run_folder = trained
    summary = export_model(run_folder, str(tmp_path / "model"))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.yaml", MODEL_FILE, WEIGHTS_FILE]
    assert summary.record["input"]["bands"] == list(BANDS) and summary.record["input"]["preprocess"]["crop"] == 40

    model = lensray.load_model(str(tmp_path / "model"))
    ids = _ids(raw)
    probabilities = model.predict_cutouts(_paths(raw, ids), ids=ids, batch_size=4)  # chunks of 4: 3 batches
    scored = score_catalog(
        run_folder, raw, storage.join(raw, CATALOG_NAME), str(tmp_path / "c.parquet"), device="cpu", gallery=0
    )
    by_id = scored.result.candidates.set_index("id")["score"]
    assert len(by_id) == N
    np.testing.assert_allclose(probabilities, by_id.loc[ids].to_numpy(), rtol=1e-6, atol=1e-9)
    # ...and the checkpoint's own network on the same inputs: the exported weights are the run's.
    run = load_run(run_folder)
    np.testing.assert_allclose(probabilities, run.predict(model.prepare(model.read(_paths(raw, ids)))), rtol=1e-6)

    # Raw arrays, as a notebook holds them: the same numbers as the files they were read from.
    stacks = {band: np.stack([fits.getdata(item[band]) for item in _paths(raw, ids)]) for band in BANDS}
    np.testing.assert_array_equal(model.predict_cutouts(stacks), probabilities)
    per_object = [{band: stacks[band][k] for band in BANDS} for k in range(3)]
    np.testing.assert_array_equal(model.predict_cutouts(per_object), probabilities[:3])
    d4 = model.predict_cutouts(per_object, tta="d4")
    assert d4.shape == (3,) and np.all((d4 > 0) & (d4 < 1)) and not np.array_equal(d4, probabilities[:3])
    with pytest.raises(ScoreError, match=r"different sizes \(\[66, 200\] px\)"):
        model.predict_cutouts(np.zeros((2, 2, 200, 200), np.float32))


def test_bad_inputs_raise_the_errors_score_names(trained: tuple[str, str], tmp_path: Path) -> None:
    raw, run_folder = trained
    export_model(run_folder, str(tmp_path / "model"))
    model = lensray.load_model(str(tmp_path / "model"))
    first = _ids(raw)[0]
    item = _paths(raw, [first])[0]
    vis, j = fits.getdata(item["VIS"]), fits.getdata(item["J"])

    with pytest.raises(CutoutError, match=f"ID {first} band J .*missing.txt.*missing: no such file"):
        model.predict_cutouts([{"VIS": item["VIS"], "J": str(tmp_path / "missing.txt")}], ids=[first])
    with pytest.raises(CutoutError, match="ID 0 band J .*missing: no J among"):
        model.predict_cutouts([{"VIS": item["VIS"]}])
    with pytest.raises(CutoutError, match=r"ID 1 band VIS .*shape: stamp is \(66, 66\), expected \(200, 200\)"):
        model.predict_cutouts([item, {"VIS": j, "J": j}])
    holed = vis.astype(np.float32)
    holed[:3, :3] = np.nan
    with pytest.raises(
        CutoutError, match=r"ID 0 band VIS .*nan: 9 of 40000 pixels are NaN/inf \(nan policy 'reject'\)"
    ):
        model.predict_cutouts([{"VIS": holed, "J": j}], nan_policy="reject")
    assert model.predict_cutouts([{"VIS": holed, "J": j}]).shape == (1,)  # the run's policy: zero
    with pytest.raises(CutoutError, match="constant: every finite pixel is 0.5"):
        model.predict_cutouts([{"VIS": np.full_like(vis, 0.5), "J": j}])
    with pytest.raises(CutoutError, match=r"ID 0 band VIS .*shape: .*3-D \(2, 200, 200\), expected 2-D"):
        model.predict_cutouts([{"VIS": np.stack([vis, vis]), "J": j}])


def _tampered(source: Path, target: Path, edit: Any) -> str:
    shutil.copytree(source, target)
    record = json.loads((target / MODEL_FILE).read_text())
    edit(record)
    (target / MODEL_FILE).write_text(json.dumps(record))
    return str(target)


def test_the_export_holds_no_pickle_and_a_tampered_record_is_named(trained: tuple[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, run_folder = trained
    folder = tmp_path / "model"
    export_model(run_folder, str(folder))
    tensors = load_file(folder / WEIGHTS_FILE)  # plain tensors, read without unpickling anything
    assert tensors and set(tensors) == set(load_run(run_folder).model.state_dict())
    for path in folder.iterdir():  # torch.save writes a zip (PK) of pickles; a bare pickle starts with 0x80
        assert path.read_bytes()[:2] not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), path

    renamed = _tampered(folder, tmp_path / "vgg", lambda r: r["network"].update(name="vgg"))
    with pytest.raises(CheckpointError, match="unknown network 'vgg'; this lensray builds lastro, resnet"):
        lensray.load_model(renamed)
    widened = _tampered(folder, tmp_path / "wide", lambda r: r["network"]["config"].update(filters=99))
    with pytest.raises(CheckpointError, match="weights do not fit the network model.json describes"):
        lensray.load_model(widened)
    rescaled = _tampered(folder, tmp_path / "scale", lambda r: r["input"]["pixel_scales"].update(J=0.2))
    with pytest.raises(CheckpointError, match="band J is 66 px at 0.2″/px in the export, 66 px at 0.3″/px here"):
        lensray.load_model(rescaled)
    restretched = _tampered(folder, tmp_path / "stretch", lambda r: r["input"]["transform"].update(log_stretch_a=10))
    with pytest.raises(CheckpointError, match="cannot reproduce the exported transform .*log_stretch_a"):
        lensray.load_model(restretched)
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    (swapped / WEIGHTS_FILE).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is not the file model.json was exported with"):
        lensray.load_model(str(swapped))
    with pytest.raises(CheckpointError, match="model.json is missing"):
        lensray.load_model(str(tmp_path / "nothing"))


def test_cli_export_writes_the_files_and_a_missing_run_is_one_line(
    trained: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lensray.evaluate.evaluate import evaluate_run

    raw, run_folder = trained
    store = str(Path(run_folder).parents[1] / "store.zarr")
    evaluation = evaluate_run(run_folder, store, tmp_path / "eval", "test", device="cpu", gallery=2)
    out = tmp_path / "exported"
    assert main(["export", run_folder, "--out", str(out), "--evaluation", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("exported LASTRO") and str(out / WEIGHTS_FILE) in printed
    record = json.loads((out / MODEL_FILE).read_text())
    run = load_run(run_folder)
    assert record["source"]["kind"] == "run" and record["source"]["checkpoint"] == run.checkpoint_url
    assert record["source"]["val_auc"] == pytest.approx(run.metrics["val_auc"])
    assert record["source"]["test_auc"] == evaluation.evaluation.headline.auc
    assert record["source"]["evaluation"]["split"] == "test" and record["source"]["evaluation"]["tta"] is None
    assert record["lensray_version"] == lensray.__version__ and record["input"]["nan_policy"] == "zero"
    assert (out / "config.yaml").read_bytes() == (Path(run.checkpoint_url) / "config.yaml").read_bytes()
    ids = _ids(raw)[:2]
    assert lensray.load_model(str(out)).predict_cutouts(_paths(raw, ids)).shape == (2,)

    missing = tmp_path / "no-such-run"
    assert main(["export", str(missing), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"lensray export: {missing} is not a checkpoint folder"), err
    assert not (tmp_path / "x").exists()


def test_a_search_stands_for_its_best_trial_on_s3(tune_search: Any, s3_bucket: str) -> None:
    checkpoint, source = resolve_source(tune_search.experiment_url)
    assert source["kind"] == "search" and checkpoint == load_best(tune_search.experiment_url).checkpoint_url
    # tiny_store's runs were trained on synthetic images with no transform record: nothing to score raw FITS with.
    with pytest.raises(CheckpointError, match="recorded no transform"):
        export_model(tune_search.experiment_url, storage.join(s3_bucket, "model"))
    assert not storage.exists(storage.join(s3_bucket, "model", MODEL_FILE))
