"""Ray Data ingest against real simulated FITS, local and on moto's S3 server."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lensray import storage
from lensray.config import DataConfig, PreprocessConfig, SimulateConfig
from lensray.ingest.ingest import IngestError, assign_splits, ingest
from lensray.ingest.preprocess import preprocess_cutout
from lensray.ingest.store import SPLITS, LensStore, StoreMismatchError
from lensray.simulate.writer import simulate_dataset
from lensray.sky.bands import band_relpath
from lensray.sky.catalog import CATALOG_NAME, apply_label_rule, read_catalog
from lensray.sky.fits import read_cutout

N_OBJECTS = 24


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> Path:
    """A small clean challenge-format set (no quirks: each test adds the bad input it needs)."""
    root = tmp_path_factory.mktemp("raw")
    simulate_dataset(
        SimulateConfig(
            out=str(root),
            n=N_OBJECTS,
            seed=11,
            nan_pixel_rate=0.0,
            offsize_nir_rate=0.0,
            missing_image_rate=0.0,
            duplicate_id_rate=0.0,
        )
    )
    return root


def _configs(images: str, store: str, **preprocess: object) -> tuple[DataConfig, PreprocessConfig]:
    data = DataConfig(images=images, catalog=storage.join(images, CATALOG_NAME))
    settings = {"out": store, "crop": 100, "bin": 2, "shard_size": 5, "workers": 2, **preprocess}
    return data, PreprocessConfig(**settings)


def _expected(data: DataConfig, preprocess: PreprocessConfig, object_id: int) -> np.ndarray:
    cutout = read_cutout(data.images, object_id, data.bands, data.nan)
    return preprocess_cutout(cutout.bands, preprocess, data.bands)


def _assert_store_matches_direct_transforms(data: DataConfig, preprocess: PreprocessConfig) -> LensStore:
    store = LensStore.open(preprocess.out)
    assert store.valid.all()
    images = store.read(np.arange(store.n))
    for k, object_id in enumerate(store.ids):
        expected = _expected(data, preprocess, int(object_id))
        assert images[k].dtype == expected.dtype
        np.testing.assert_array_equal(images[k], expected, err_msg=f"ID {object_id}")
    return store


@pytest.mark.parametrize("mode", ["asinh", "log", "clip"])
def test_local_pipeline_equals_direct_transforms_bit_for_bit(raw_root: Path, tmp_path: Path, mode: str) -> None:
    data, preprocess = _configs(str(raw_root), str(tmp_path / "store.zarr"), mode=mode)
    summary = ingest(data, preprocess, progress=False)
    assert summary.n_written == N_OBJECTS and not summary.rejects
    store = _assert_store_matches_direct_transforms(data, preprocess)
    labelled = apply_label_rule(read_catalog(data.catalog), "paper")
    np.testing.assert_array_equal(store.ids, labelled.ids)
    np.testing.assert_array_equal(store.labels, labelled.labels)
    assert store.meta["preprocess"]["mode"] == mode
    assert store.meta["label_rule"] == "paper"
    assert store.meta["source"]["images"] == str(raw_root)


def test_s3_pipeline_equals_direct_transforms(raw_root: Path, s3_bucket: str) -> None:
    raw_url = storage.join(s3_bucket, "raw")
    for path in raw_root.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(raw_url, str(path.relative_to(raw_root))), path.read_bytes())
    data, preprocess = _configs(raw_url, storage.join(s3_bucket, "stores", "s.zarr"), dtype="float32")
    summary = ingest(data, preprocess, progress=False)
    assert summary.n_written == N_OBJECTS
    _assert_store_matches_direct_transforms(data, preprocess)


def test_resume_skips_complete_shards_and_rebuilds_deleted_ones(raw_root: Path, tmp_path: Path) -> None:
    store_url = str(tmp_path / "store.zarr")
    data, preprocess = _configs(str(raw_root), store_url)
    first = ingest(data, preprocess, progress=False)
    assert first.shards_written == first.n_shards == 5
    before = {p.relative_to(store_url): p.read_bytes() for p in Path(store_url).rglob("*") if p.is_file()}

    again = ingest(data, preprocess, progress=False)
    assert again.shards_written == 0 and again.shards_skipped == 5

    # A lost shard (a task killed before its done mark, or a deleted object) is rebuilt, bit for bit.
    for path in Path(store_url).rglob("*"):
        if path.is_file() and "shard_done" in str(path) and path.name.endswith("2"):
            path.unlink()
    resumed = ingest(data, preprocess, progress=False)
    assert resumed.shards_written == 1 and resumed.shards_skipped == 4
    after = {p.relative_to(store_url): p.read_bytes() for p in Path(store_url).rglob("*") if p.is_file()}
    changed = sorted(str(k) for k in before if before[k] != after.get(k) and "zarr.json" not in str(k))
    assert changed == [], f"objects differ after resume: {changed}"


def _files(store_url: str) -> dict[str, bytes]:
    """Every object of a local store by key, without the JSON metadata (it holds timestamps)."""
    root = Path(store_url)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != "zarr.json" and not p.name.endswith(".partial")
    }


def _leave_half_written_shard(store_url: str, shard: int) -> None:
    """What a task killed while writing ``shard`` leaves: the store reopened by a rerun (state ready),
    the shard's images object cut short with zarr's temporary file beside it, its valid chunk and report
    not written yet, and no done mark (write_shard sets that last)."""
    import zarr

    from lensray.ingest.store import create_store

    group = zarr.open_group(store_url, mode="r")
    fingerprint, layout = group.attrs["fingerprint"], group.attrs["layout"]
    create_store(  # the rerun's reopen: same parameters, so the finished shards are kept
        store_url,
        ids=group["ids"][:],
        labels=group["labels"][:],
        split=group["split"][:],
        channels=layout["channels"],
        size=(layout["height"], layout["width"]),
        dtype=layout["dtype"],
        shard_size=layout["shard_size"],
        meta=fingerprint["meta"],
    )
    root = Path(store_url)
    images = root / "images" / "c" / str(shard) / "0" / "0" / "0"
    data = images.read_bytes()
    images.write_bytes(data[: len(data) // 2])
    images.with_suffix(".0123456789abcdef.partial").write_bytes(data[: len(data) // 3])
    (root / "valid" / "c" / str(shard)).unlink()
    (root / "shard_reports" / f"shard-{shard:06d}.json").unlink()
    (root / "shard_done" / "c" / str(shard)).unlink()


def test_half_written_shard_is_detected_never_read_and_rewritten(raw_root: Path, tmp_path: Path) -> None:
    from lensray.ingest.store import StoreIncompleteError, completed_shards, finalize_store

    data, reference = _configs(str(raw_root), str(tmp_path / "reference.zarr"))
    ingest(data, reference, progress=False)  # uninterrupted
    store_url = str(tmp_path / "store.zarr")
    preprocess = reference.model_copy(update={"out": store_url})
    ingest(data, preprocess, progress=False)
    _leave_half_written_shard(store_url, 2)

    assert completed_shards(store_url) == {0, 1, 3, 4}
    store = LensStore.open(store_url)
    assert "NOT FINALIZED: 4 of 5" in store.info()
    with pytest.raises(StoreIncompleteError, match="not finalized"):
        store.read(np.arange(store.n))  # never read as data
    with pytest.raises(StoreIncompleteError, match=r"\[2\]"):
        finalize_store(store_url)

    resumed = ingest(data, preprocess, progress=False)
    assert resumed.shards_written == 1 and resumed.shards_skipped == 4
    assert _files(store_url) == _files(reference.out)
    assert LensStore.open(store_url).read(np.arange(N_OBJECTS)).tobytes() == (
        LensStore.open(reference.out).read(np.arange(N_OBJECTS)).tobytes()
    )


_INGEST_SCRIPT = """
import sys
from lensray.config import DataConfig, PreprocessConfig
from lensray.ingest.ingest import ingest
ingest(DataConfig.model_validate_json(sys.argv[1]), PreprocessConfig.model_validate_json(sys.argv[2]), progress=False)
"""


def _done_shards(store_url: str) -> set[int]:
    from lensray.ingest.store import StoreError, completed_shards

    try:
        return completed_shards(store_url)
    except (FileNotFoundError, StoreError):  # not created yet, or still being created
        return set()


def _wait_until_still(store_url: str, quiet_s: float = 1.5, limit_s: float = 60.0) -> None:
    """Until no object of the store changes for ``quiet_s``: the killed driver's tasks are gone."""
    deadline = time.monotonic() + limit_s
    last, still_since = _files(store_url), time.monotonic()
    while time.monotonic() - still_since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        now = _files(store_url)
        if now != last:
            last, still_since = now, time.monotonic()


def test_ingest_killed_mid_way_then_rerun_equals_an_uninterrupted_run(raw_root: Path, tmp_path: Path) -> None:
    """A real fault: the driver process SIGKILLed once some shards are done (it connects to the test's
    cluster through RAY_ADDRESS, so Ray ends its tasks); the rerun writes the rest, bit for bit."""
    data, reference = _configs(str(raw_root), str(tmp_path / "reference.zarr"), shard_size=1, workers=1)
    ingest(data, reference, progress=False)
    store_url = str(tmp_path / "killed.zarr")
    preprocess = reference.model_copy(update={"out": store_url})
    arguments = [data.model_dump_json(), preprocess.model_dump_json()]
    process = subprocess.Popen([sys.executable, "-c", _INGEST_SCRIPT, *arguments])
    try:
        deadline, done = time.monotonic() + 180, set()
        while not done and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
            done = _done_shards(store_url)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the ingest ended before it was killed"
    _wait_until_still(store_url)
    done = _done_shards(store_url)
    assert 0 < len(done) < N_OBJECTS, done

    resumed = ingest(data, preprocess, progress=False)
    assert resumed.shards_skipped == len(done) and resumed.shards_written == N_OBJECTS - len(done)
    assert _files(store_url) == _files(reference.out)


def test_other_config_against_existing_store_is_an_error(raw_root: Path, tmp_path: Path) -> None:
    store_url = str(tmp_path / "store.zarr")
    data, preprocess = _configs(str(raw_root), store_url, limit=10)
    ingest(data, preprocess, progress=False)
    _, other = _configs(str(raw_root), store_url, limit=10, mode="log")
    with pytest.raises(StoreMismatchError, match="mode"):
        ingest(data, other, progress=False)


@pytest.fixture()
def damaged_root(raw_root: Path, tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """A copy of the raw set with one object per bad-input kind, and a catalogue row without images."""
    from astropy.io import fits

    root = tmp_path / "damaged"
    shutil.copytree(raw_root, root)
    ids = [int(i) for i in read_catalog(str(root / CATALOG_NAME)).ids]
    expected = {}
    (root / band_relpath("J", ids[0])).unlink()
    expected[ids[0]] = "missing"
    path = root / band_relpath("VIS", ids[1])
    path.write_bytes(path.read_bytes()[:3000])
    expected[ids[1]] = "corrupt"
    fits.writeto(root / band_relpath("Y", ids[2]), np.full((66, 66), np.nan, np.float32), overwrite=True)
    expected[ids[2]] = "all_nan"
    fits.writeto(root / band_relpath("H", ids[3]), np.zeros((66, 66), np.float32), overwrite=True)
    expected[ids[3]] = "all_nan"  # all-zero images are rejected like all-NaN ones
    (root / band_relpath("VIS", ids[4])).write_bytes(b"not a FITS file at all" * 200)
    expected[ids[4]] = "corrupt"
    for band in ("VIS", "Y", "J", "H"):  # a catalogue row whose images were never delivered
        (root / band_relpath(band, ids[5])).unlink()
    expected[ids[5]] = "missing"
    image = fits.getdata(root / band_relpath("VIS", ids[6])).astype(np.float32)
    image[10:12, 10:14] = np.nan
    fits.writeto(root / band_relpath("VIS", ids[6]), image, overwrite=True)
    return root, expected


def test_bad_inputs_are_rejected_recorded_and_never_written(
    damaged_root: tuple[Path, dict[int, str]], tmp_path: Path
) -> None:
    root, expected = damaged_root
    nan_id = sorted(read_catalog(str(root / CATALOG_NAME)).ids)[6]
    data, preprocess = _configs(str(root), str(tmp_path / "store.zarr"))
    summary = ingest(data, preprocess, progress=False)
    got = {r["id"]: r["reason"] for r in summary.rejects}
    # The "all_nan" reason covers both all-NaN and all-zero stamps; whichever name fits_io gives, it is named.
    assert set(got) == set(expected)
    for object_id, reason in expected.items():
        assert got[object_id] in ({reason} if reason != "all_nan" else {"all_nan", "empty"}), (
            object_id,
            got[object_id],
        )
    store = LensStore.open(preprocess.out)
    assert store.meta["counts"]["valid"] == N_OBJECTS - len(expected)
    assert {r["id"] for r in store.meta["rejects"]} == set(expected)
    rejected_rows = np.isin(store.ids, list(expected))
    assert not store.valid[rejected_rows].any()
    raw = store.read(np.flatnonzero(rejected_rows), allow_invalid=True)
    assert np.isnan(raw).all(), "a rejected cutout must never read back as an image"
    # NaN pixels under policy "zero": kept, zeroed, and counted.
    assert nan_id in set(store.ids[store.valid])
    assert store.meta["shard_stats"]["nan_pixels"] == 8 and store.meta["shard_stats"]["nan_ids"] == 1
    assert "rejected" in store.info()

    strict = preprocess.model_copy(update={"out": str(tmp_path / "strict.zarr"), "strict": True})
    with pytest.raises(IngestError, match="rejected"):
        ingest(data, strict, progress=False)


def test_nan_policy_reject(damaged_root: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    root, _ = damaged_root
    nan_id = sorted(read_catalog(str(root / CATALOG_NAME)).ids)[6]
    data, preprocess = _configs(str(root), str(tmp_path / "store.zarr"))
    summary = ingest(data.model_copy(update={"nan": "reject"}), preprocess, progress=False)
    assert {r["id"]: r["reason"] for r in summary.rejects}[nan_id] == "nan"


def test_splits_are_stable_when_the_catalogue_grows() -> None:
    small = np.arange(200001, 201001)
    grown = np.arange(200001, 205001)
    a = assign_splits(small, 0.1, 0.2, seed=3)
    b = assign_splits(grown, 0.1, 0.2, seed=3)
    np.testing.assert_array_equal(a, b[: len(small)])
    fractions = np.bincount(b, minlength=3) / len(b)
    assert abs(fractions[SPLITS["val"]] - 0.1) < 0.02 and abs(fractions[SPLITS["test"]] - 0.2) < 0.02
    assert (assign_splits(small, 0.1, 0.2, seed=4) != a).any()


def test_wrong_urls_fail_fast_naming_them(raw_root: Path, tmp_path: Path, s3_server: str) -> None:
    data, preprocess = _configs(str(tmp_path / "nowhere"), str(tmp_path / "s.zarr"))
    with pytest.raises(storage.StorageError, match="nowhere"):
        ingest(data, preprocess, progress=False)
    data, preprocess = _configs("s3://no-such-bucket-lensray/raw", str(tmp_path / "s.zarr"))
    with pytest.raises(storage.StorageError, match="no-such-bucket-lensray"):
        ingest(data, preprocess, progress=False)
    data, preprocess = _configs(str(raw_root), "s3://no-such-out-bucket/s.zarr")
    with pytest.raises(storage.StorageError, match="no-such-out-bucket"):
        ingest(data, preprocess, progress=False)


def test_cli_preprocess_and_store_info(raw_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lensray.cli import main

    store_url = str(tmp_path / "cli.zarr")
    code = main(
        [
            "preprocess",
            "--images",
            str(raw_root),
            "--catalog",
            str(raw_root / CATALOG_NAME),
            "--out",
            store_url,
            "--bands",
            "VIS,H",
            "--crop",
            "64",
            "--bin",
            "2",
            "--labels",
            "paper",
            "--limit",
            "8",
            "--shard-size",
            "4",
        ]
    )
    assert code == 0
    store = LensStore.open(store_url)
    assert store.n == 8 and store.sample_shape == (2, 32, 32)
    assert main(["store", "info", store_url]) == 0
    out = capsys.readouterr().out
    assert "train" in out and store_url in out
