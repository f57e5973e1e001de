"""Every shipped survey profile end to end, on files in the survey's own layout (issue 15): simulate a small
set -> ingest it from its Parquet catalogue (label and RA/Dec columns) -> train one short epoch -> score the
raw cutouts, with RA/Dec and a requested column carried to the candidates -> the grading page's pictures. The challenge profile takes the
same path in test_score.py and test_pipeline.py (its catalogue has no coordinates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_run import tiny_run_config

from lensray import storage
from lensray.config import DataConfig, PreprocessConfig, SimulateConfig, load_config
from lensray.evaluate.score import score_catalog
from lensray.grade.images import COMPOSITE
from lensray.grade.server import grading_session
from lensray.ingest.ingest import ingest
from lensray.ingest.store import LensStore
from lensray.profiles import PROFILES
from lensray.simulate.writer import simulate_dataset
from lensray.train.trainer import train

N = 12
CROP = {"euclid_mer": 40, "hsc": 32, "lsst": 40}  # a small central crop keeps the run to seconds
QUIET = {"nan_pixel_rate": 0.0, "offsize_nir_rate": 0.0, "missing_image_rate": 0.0, "duplicate_id_rate": 0.0}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CROP))
def test_profile_simulate_ingest_train_score(name: str, tmp_path: Path, ray_cluster: None) -> None:
    profile = PROFILES[name]
    raw = str(tmp_path / "raw")
    simulate_dataset(SimulateConfig(out=raw, n=N, seed=5, workers=2, **QUIET), profile)
    catalog = storage.join(raw, "catalog.parquet")
    keep = f"mag_{profile.reference}"
    data = DataConfig(
        images=raw,
        catalog=catalog,
        profile=name,
        label_column="is_lens",
        coord_columns=("ra", "dec"),
        keep_columns=(keep,),
    )
    store_url = str(tmp_path / "store.zarr")
    preprocess = PreprocessConfig(out=store_url, crop=CROP[name], bin=2, shard_size=6, workers=2, val_fraction=0.25)
    ingest(data, preprocess, progress=False)
    store = LensStore.open(store_url)
    assert store.n == N and store.profile == profile
    assert store.read(np.arange(N)).shape == (N, len(profile.bands), CROP[name] // 2, CROP[name] // 2)

    run = train(tiny_run_config(store_url, tmp_path / "runs", name))
    saved = load_config(Path(run.run_url) / "config.yaml")  # the run says what its network takes
    assert saved.data.profile == profile and saved.data.bands == profile.band_names
    out = str(tmp_path / "candidates.parquet")
    summary = score_catalog(run.best_checkpoint, raw, catalog, out, device="cpu", gallery=4, data=data)

    candidates = pd.read_parquet(out)
    truth = pd.read_parquet(catalog).set_index("ID")
    assert summary.n_scored == N and sorted(candidates["id"]) == sorted(truth.index)
    assert list(candidates["rank"]) == list(range(1, N + 1))
    assert candidates["score"].is_monotonic_decreasing and candidates["score"].between(0, 1).all()
    matched = truth.loc[candidates["id"]]
    np.testing.assert_allclose(candidates["ra"], matched["ra"])
    np.testing.assert_allclose(candidates["dec"], matched["dec"])
    np.testing.assert_allclose(candidates[keep], matched[keep])

    # The grading page reads the same cutouts in the profile the candidates were scored in.
    session = grading_session(out, str(tmp_path / "grades.parquet"), grader="tester")
    assert session.profile == profile and session.bands == profile.band_names
    best = int(candidates["id"].iloc[0])
    for picture in (profile.reference, COMPOSITE):
        assert session.png(best, picture).startswith(b"\x89PNG")
