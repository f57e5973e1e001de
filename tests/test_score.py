"""Scoring a catalogue of raw cutouts with Ray Data: the run's own transform, ranked candidates, rejects
listed (never scored), D4 views, local and S3, the checkpoint's transform record checked; catalogues with
custom columns (labels as the challenge rule gives them; unlabelled ones ingest and score, with RA/Dec)."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table
from tiny_run import tiny_run_config

from lensray import storage
from lensray.cli import main
from lensray.config import DataConfig, PreprocessConfig, SimulateConfig
from lensray.errors import CheckpointError, EvaluateError, FeedError, ScoreError
from lensray.evaluate.score import score_catalog
from lensray.evaluate.score_inputs import read_ids
from lensray.ingest.ingest import ingest
from lensray.ingest.store import LensStore
from lensray.runs import model_input
from lensray.simulate.writer import simulate_dataset
from lensray.sky.bands import band_relpath
from lensray.sky.catalog import CATALOG_NAME, apply_label_rule, read_catalog
from lensray.train.feed import sanity_set
from lensray.train.trainer import MODEL_INPUT_FILE, train

N = 16
CORRUPT_ID, MISSING_ID = 200003, 200007


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> str:
    root = str(tmp_path_factory.mktemp("score") / "raw")
    simulate_dataset(
        SimulateConfig(
            out=root,
            n=N,
            seed=11,
            nan_pixel_rate=0.0,
            offsize_nir_rate=0.0,
            missing_image_rate=0.0,
            duplicate_id_rate=0.0,
            workers=2,
        )
    )
    return root


@pytest.fixture(scope="module")
def trained(raw: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """``(checkpoint, store)``: a tiny run on the ingested raw set; then two cutouts are damaged."""
    folder = tmp_path_factory.mktemp("score_run")
    store_url = str(folder / "store.zarr")
    data = DataConfig(images=raw, catalog=storage.join(raw, CATALOG_NAME), bands=("VIS", "J"))
    ingest(
        data,
        PreprocessConfig(
            out=store_url, crop=40, bin=2, shard_size=8, val_fraction=0.3, test_fraction=0.2, split_seed=3
        ),
        progress=False,
    )
    store = LensStore.open(store_url)
    assert len(set(store.labels[store.indices("val")].tolist())) == 2, "the fixture needs both classes in val"
    config = tiny_run_config(store_url, folder / "runs", "score")
    outcome = train(config)
    # Damage two objects after ingest: one truncated FITS file, one band file gone.
    vis = Path(raw) / band_relpath("VIS", CORRUPT_ID)
    vis.write_bytes(vis.read_bytes()[:3000])
    (Path(raw) / band_relpath("J", MISSING_ID)).unlink()
    return outcome.best_checkpoint, store_url


def _read_parquet(url: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.read_bytes(url)))


def test_scores_equal_the_store_predictions_and_rejects_are_listed(
    raw: str, trained: tuple[str, str], tmp_path: Path
) -> None:
    from lensray.runs import load_run

    checkpoint, store_url = trained
    out = str(tmp_path / "candidates.parquet")
    summary = score_catalog(
        checkpoint, raw, storage.join(raw, CATALOG_NAME), out, device="cpu", batch_size=5, gallery=6
    )
    candidates = _read_parquet(out)
    assert len(candidates) == N - 2 and summary.n_scored == N - 2
    pd.testing.assert_frame_equal(candidates, summary.result.candidates)  # the file holds the typed result
    assert summary.result.gallery_images.shape[0] == 6
    assert CORRUPT_ID not in set(candidates["id"]) and MISSING_ID not in set(candidates["id"])
    assert candidates["rank"].tolist() == list(range(1, N - 1))
    assert (np.diff(candidates["score"]) <= 0).all(), "candidates must be ranked best first"
    rejects = pd.read_csv(tmp_path / "candidates_rejects.csv")
    assert dict(zip(rejects["id"], rejects["reason"], strict=False)) == {CORRUPT_ID: "corrupt", MISSING_ID: "missing"}
    assert rejects["message"].str.contains(str(CORRUPT_ID)).any()

    # Raw FITS -> the run's transform -> scores: the same as predicting the store's own images.
    store = LensStore.open(store_url)
    rows = np.searchsorted(store.ids, candidates["id"].to_numpy())
    expected = load_run(checkpoint).predict(store.read(rows))
    np.testing.assert_allclose(candidates["score"], expected, rtol=1e-5, atol=1e-7)

    saved = json.loads((tmp_path / "candidates_summary.json").read_text())
    assert saved["n_rejected"] == 2 and saved["bands"] == ["VIS", "J"] and saved["transform"]["crop"] == 40
    assert any("crop" in note for note in summary.notes), "the run config's crop differs from its store's"
    assert "rejected 200003" in str(summary)
    gallery = (tmp_path / "candidates_gallery.html").read_text()
    assert gallery.count("data:image/png;base64,") == 1 and str(candidates["id"][0]) in gallery
    assert "corrupt" in gallery


def test_tta_scores_every_view_and_s3_works(raw: str, trained: tuple[str, str], s3_bucket: str) -> None:
    checkpoint, _ = trained
    remote = storage.join(s3_bucket, "raw")
    for path in Path(raw).rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(remote, str(path.relative_to(raw))), path.read_bytes())
    out = storage.join(s3_bucket, "out", "candidates.parquet")
    summary = score_catalog(
        checkpoint, remote, storage.join(remote, CATALOG_NAME), out, tta="d4", device="cpu", gallery=4
    )
    candidates = _read_parquet(out)
    assert summary.n_scored == N - 2 and len(candidates) == N - 2
    views = candidates[[f"score_d4_{k}" for k in range(8)]].to_numpy()
    np.testing.assert_allclose(candidates["score"], views.mean(axis=1), rtol=1e-12)
    assert np.ptp(views, axis=1).max() > 0, "the D4 views should not all agree"
    rejects = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(s3_bucket, "out", "candidates_rejects.csv"))))
    assert sorted(rejects["id"]) == [CORRUPT_ID, MISSING_ID]
    assert b"<img" in storage.read_bytes(storage.join(s3_bucket, "out", "candidates_gallery.html"))


def test_a_plain_id_list_is_a_catalogue(
    raw: str, trained: tuple[str, str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Also: nothing from Ray on stderr with one scoring actor. An object-store reference among the actors'
    arguments made Ray's core worker log an error line (ray-project/ray#53727) straight to file descriptor 2.
    (With two or more actors Ray Data's own reference to the map function still draws one such line a run.)"""
    listing = tmp_path / "ids.csv"
    listing.write_text("# survey list\nID,ra\n200001,1.0\n200002,2.0\n200001,1.0\n200003,3.0\n")
    ids, repeated = read_ids(str(listing))
    assert ids.tolist() == [200001, 200002, 200003] and repeated == [200001]
    run_folder = str(Path(trained[0]).parent)  # a run folder stands for its best checkpoint
    assert (
        main(
            [
                "score",
                "--run",
                run_folder,
                "--images",
                raw,
                "--catalog",
                str(listing),
                "--out",
                str(tmp_path / "c.parquet"),
                "--device",
                "cpu",
                "--gallery",
                "0",
            ]
        )
        == 0
    )
    printed = capfd.readouterr()
    assert "scored 2 of 3 IDs" in printed.out and "object store" not in printed.err, printed.err
    assert _read_parquet(str(tmp_path / "c.parquet"))["id"].tolist().count(200001) == 1
    assert pd.read_csv(tmp_path / "c_rejects.csv")["id"].tolist() == [CORRUPT_ID]
    assert not (tmp_path / "c_gallery.html").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("ID\n200001\nabc\n")
    with pytest.raises(ScoreError, match="row 2 is 'abc'"):
        read_ids(str(bad))


def test_checkpoint_without_a_transform_record_is_refused(trained: tuple[str, str], tmp_path: Path) -> None:
    copy = tmp_path / "checkpoint"
    shutil.copytree(trained[0], copy)
    record = json.loads((copy / MODEL_INPUT_FILE).read_text())
    assert model_input(str(copy)).preprocess.crop == 40
    record["transform"]["log_stretch_a"] = 10.0  # a transform this lensray does not compute
    (copy / MODEL_INPUT_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="cannot reproduce the training transform .*log_stretch_a"):
        model_input(str(copy))
    record["transform"] = None
    (copy / MODEL_INPUT_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="recorded no transform"):
        model_input(str(copy))


# --- catalogues as astronomers keep them ----------------------------------------------------------


def _survey_columns(raw: str, ids: list[int]) -> Table:
    """The simulated objects as a survey table: ``objid``, ``RA_deg``/``DEC_deg`` and a text column."""
    return Table(
        {
            "objid": np.asarray(ids, dtype=np.int64),
            "RA_deg": [150.0 + 0.001 * (i % 1000) for i in ids],
            "DEC_deg": [2.0 - 0.001 * (i % 1000) for i in ids],
            "field": [f"tile-{i % 3}" for i in ids],
        }
    )


def test_a_custom_fits_catalogue_gives_the_challenge_labels(
    raw: str, trained: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    challenge = read_catalog(storage.join(raw, CATALOG_NAME))
    paper = apply_label_rule(challenge, "paper")
    table = _survey_columns(raw, paper.ids.tolist())
    table["is_lens"] = paper.labels.astype(bool)
    fits_url = str(tmp_path / "lenses.fits")
    table[::-1].write(fits_url)  # another row order: the store sorts by ID
    store_url = str(tmp_path / "custom.zarr")
    flags = ["--id-column", "objid", "--label-column", "is_lens", "--coord-columns", "RA_deg,DEC_deg"]
    geometry = ["--bands", "VIS,J", "--crop", "40", "--bin", "2", "--shard-size", "8"]
    splits = ["--set", "preprocess.val_fraction=0.3", "--set", "preprocess.test_fraction=0.2"]
    argv = ["preprocess", "--images", raw, "--catalog", fits_url, "--out", store_url, *flags, *geometry, *splits]
    assert main([*argv, "--set", "preprocess.split_seed=3"]) == 0
    custom, reference = LensStore.open(store_url), LensStore.open(trained[1])
    assert custom.ids.tolist() == reference.ids.tolist()
    assert custom.labels.tolist() == reference.labels.tolist() and custom.split.tolist() == reference.split.tolist()
    assert custom.meta["label_rule"] == "column:is_lens" and custom.meta["catalog"]["id_column"] == "objid"
    assert "catalog" not in reference.meta and reference.meta["label_rule"] == "paper"  # the challenge meta as before
    capsys.readouterr()


def test_an_unlabelled_parquet_catalogue_ingests_and_scores(
    raw: str, trained: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lensray.evaluate.inference import predict_split
    from lensray.runs import load_run

    ids = [200001, 200002, CORRUPT_ID, 200005, 200006, 200002]  # 200002 twice: scored once
    parquet_url = str(tmp_path / "survey.parquet")
    _survey_columns(raw, ids).write(parquet_url)

    data = DataConfig(images=raw, catalog=parquet_url, id_column="objid", bands=("VIS", "J"))
    store_url = str(tmp_path / "unlabelled.zarr")
    preprocess = PreprocessConfig(out=store_url, crop=40, bin=2, val_fraction=0.0, test_fraction=0.0)
    summary = ingest(data, preprocess, progress=False)
    assert summary.unlabelled == 5 and "5 IDs unlabelled (label -1)" in str(summary)
    store = LensStore.open(store_url)
    assert store.ids.tolist() == sorted(set(ids)) and set(store.labels.tolist()) == {-1}
    assert store.meta["label_rule"] == "unlabelled"
    with pytest.raises(FeedError, match=r"no labelled objects \(4 unlabelled: .*--label-column"):
        sanity_set(store, 4, 0)
    with pytest.raises(EvaluateError, match="holds no labelled objects"):
        predict_split(load_run(trained[0]), store, "train")
    # lensray train refuses it on the driver, in one line, before any run folder or Ray Train worker exists.
    runs = tmp_path / "runs"
    capsys.readouterr()  # the ingest's warnings above
    argv = ["train", "--store", store_url, "--out", str(runs), "--name", "unlabelled", "--device", "cpu"]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds no labelled objects" in error[0] and "--label-column" in error[0], error
    assert not runs.exists()

    out = str(tmp_path / "candidates.parquet")
    columns = ["--id-column", "objid", "--coord-columns", "RA_deg,DEC_deg", "--keep-columns", "field"]
    argv = ["score", "--run", trained[0], "--images", raw, "--catalog", parquet_url, "--out", out, *columns]
    assert main([*argv, "--device", "cpu", "--gallery", "2"]) == 0
    printed = capsys.readouterr().out
    assert "scored 4 of 5 IDs" in printed and "RA 150.00" in printed
    candidates = _read_parquet(out)
    assert list(candidates.columns) == ["rank", "id", "score", "ra", "dec", "field"]
    expected = _survey_columns(raw, sorted(set(ids) - {CORRUPT_ID})).to_pandas().set_index("objid")
    got = candidates.set_index("id").loc[expected.index]
    np.testing.assert_allclose(got["ra"], expected["RA_deg"])
    np.testing.assert_allclose(got["dec"], expected["DEC_deg"])
    assert got["field"].tolist() == expected["field"].tolist()
    saved = json.loads((tmp_path / "candidates_summary.json").read_text())
    assert saved["catalog_columns"] == ["ra", "dec", "field"] and {"ra", "dec"} <= set(saved["top"][0])
    assert "<th>ra</th>" in (tmp_path / "candidates_gallery.html").read_text()


def test_catalogue_column_errors_are_one_line(
    raw: str, trained: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parquet_url = str(tmp_path / "survey.parquet")
    _survey_columns(raw, [200001, 200002]).write(parquet_url)
    with pytest.raises(ScoreError, match=r"survey\.parquet: no ID column 'ID' \(columns: objid, RA_deg"):
        read_ids(parquet_url)
    with pytest.raises(ScoreError, match=r"survey\.parquet: no kept column 'z_phot'"):
        read_ids(parquet_url, DataConfig(id_column="objid", keep_columns=("z_phot",)))
    base = ["score", "--run", trained[0], "--images", raw, "--catalog", parquet_url, "--out", str(tmp_path / "c.pq")]
    assert main([*base, "--id-column", "objid", "--coord-columns", "ra,dec"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("lensray score: catalogue ")
    assert f"{parquet_url}: no RA column 'ra'" in error


# --- at survey scale: streamed parts, resume after a kill, another model refused ------------------


def _replicated(raw: str, folder: Path, n: int) -> tuple[str, str]:
    """``(images root, catalogue)`` of ``n`` IDs hard-linked to the raw set's files (damaged ones included)."""
    root = folder / "big"
    sources = read_catalog(storage.join(raw, CATALOG_NAME)).ids.tolist()
    ids = [400001 + k for k in range(n)]
    for new_id, source in zip(ids, sources * (n // len(sources) + 1), strict=False):
        for band in ("VIS", "J"):
            if (Path(raw) / band_relpath(band, source)).exists():
                (root / band_relpath(band, new_id)).parent.mkdir(parents=True, exist_ok=True)
                (root / band_relpath(band, new_id)).hardlink_to(Path(raw) / band_relpath(band, source))
    listing = folder / "big.csv"
    listing.write_text("ID\n" + "\n".join(map(str, ids)) + "\n")
    return str(root), str(listing)


def _parts(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in sorted(folder.glob("part-*.parquet"))}


def _killed_after_first_part(argv: list[str], parts: Path) -> dict[str, int]:
    """Run ``lensray score`` in a subprocess, SIGKILL it once its first part is written; the parts left."""
    process = subprocess.Popen([sys.executable, "-m", "lensray", *argv], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _parts(parts) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before, after = {}, _parts(parts)
    while after != before:  # an actor of the killed job may still be finishing its part
        before = after
        time.sleep(2.0)
        after = _parts(parts)
    return after


@pytest.mark.slow
def test_a_killed_score_resumes_without_rescoring_finished_parts(
    raw: str, trained: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq
    import torch

    images, listing = _replicated(raw, tmp_path, 160)
    out, parts = tmp_path / "c.parquet", tmp_path / "c_parts"
    argv = ["score", "--run", trained[0], "--images", images, "--catalog", listing, "--out", str(out)]
    argv += ["--device", "cpu", "--actors", "1", "--part-size", "4", "--batch-size", "4", "--gallery", "0"]
    finished = _killed_after_first_part(argv, parts)
    assert 0 < len(finished) < 40, f"the kill should land mid-run: {len(finished)} of 40 parts written"
    assert not out.exists()

    assert main(argv) == 0
    assert f"{len(finished)} resumed from an earlier run" in capsys.readouterr().out
    assert {name: _parts(parts)[name] for name in finished} == finished, "finished parts must not be rescored"
    assert len(_parts(parts)) == 40
    reference = score_catalog(
        trained[0], images, listing, str(tmp_path / "ref.parquet"), device="cpu", part_size=32, gallery=0
    )
    pd.testing.assert_frame_equal(_read_parquet(str(out)), reference.result.candidates)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "c_rejects.csv"), pd.read_csv(tmp_path / "ref_rejects.csv"))
    assert len(reference.rejects) == 20 and reference.n_scored == 140

    # Each part is a Parquet file of its own; the folder reads as one table (the manifest is skipped).
    rows = pd.concat([pq.read_table(parts / name).to_pandas() for name in finished], ignore_index=True)
    assert len(rows) == 4 * len(finished) and list(rows.columns) == ["id", "score", "reason", "message"]
    whole = pq.read_table(parts).to_pandas().sort_values("id")
    assert whole["id"].tolist() == list(range(400001, 400161)) and whole["score"].isna().sum() == 20

    # Another model's parts are refused; --fresh discards them and scores afresh.
    other = tmp_path / "other_checkpoint"
    shutil.copytree(trained[0], other)
    state = torch.load(other / "state.pt", weights_only=True)
    state["model"] = {key: value * 1.5 if value.is_floating_point() else value for key, value in state["model"].items()}
    torch.save(state, other / "state.pt")
    argv[argv.index(trained[0])] = str(other)
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "holds 40 finished part(s) of another scoring job (it differs in weights_sha256)" in error
    assert main([*argv, "--fresh"]) == 0
    assert "discarded 40 finished part(s)" in capsys.readouterr().out
    assert not np.allclose(_read_parquet(str(out))["score"], reference.result.candidates["score"])


def test_split_pipeline_scores_as_the_fused_one(raw: str, trained: tuple[str, str], tmp_path: Path) -> None:
    """The GPU layout (CPU tasks prepare, actors predict), run on CPUs: the same scores as one actor per CPU."""
    from lensray.evaluate.score import compute_scores
    from lensray.evaluate.score_inputs import prepare_scoring

    inputs = prepare_scoring(trained[0], raw, storage.join(raw, CATALOG_NAME))
    fused = compute_scores(inputs, str(tmp_path / "fused"), device="cpu", part_size=5, gallery=0)
    split = compute_scores(inputs, str(tmp_path / "split"), device="cpu", part_size=5, gallery=0, split=True)
    assert fused.parts.n_parts == 4 and fused.actors == 2 and split.actors == 1
    pd.testing.assert_frame_equal(fused.candidates, split.candidates)
    pd.testing.assert_frame_equal(fused.rejects, split.rejects)
