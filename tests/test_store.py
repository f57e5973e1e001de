"""The Zarr store: whole-shard writes, resume, metadata, batched reads; on local disk and moto S3."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lensray import storage
from lensray.ingest.store import (
    SPLITS,
    LensStore,
    StoreError,
    StoreIncompleteError,
    StoreMismatchError,
    completed_shards,
    create_store,
    finalize_store,
    shard_ranges,
    write_shard,
)

CHANNELS, SIZE, SHARD = 2, 8, 4


@dataclass
class Dataset:
    """A tiny ingest: what the driver knows up front plus what each shard task would produce."""

    ids: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    images: np.ndarray  # float32, as a transform would return them
    valid: np.ndarray
    reasons: dict[int, str]  # rejected ID -> reason

    def shard(self, index: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        start, stop = shard_ranges(len(self.ids), SHARD)[index]
        rejects = [
            {"id": int(i), "reason": self.reasons[int(i)], "message": f"detail for {i}"}
            for i in self.ids[start:stop][~self.valid[start:stop]]
        ]
        return self.images[start:stop], self.valid[start:stop], rejects


def make_dataset(n: int = 10, seed: int = 0, rejected_rows: tuple[int, ...] = (1, 5, 6)) -> Dataset:
    rng = np.random.default_rng(seed)
    ids = np.arange(200001, 200001 + n, dtype=np.int64)
    valid = np.ones(n, dtype=bool)
    valid[list(rejected_rows)] = False
    images = rng.normal(0.0, 3.0, size=(n, CHANNELS, SIZE, SIZE)).astype(np.float32)
    images[~valid] = rng.normal(size=images[~valid].shape)  # garbage the store must not write
    reasons = {int(ids[r]): ("missing_image" if k % 2 == 0 else "all_nan") for k, r in enumerate(rejected_rows)}
    return Dataset(
        ids=ids,
        labels=rng.integers(0, 2, n).astype(np.int8),
        split=rng.integers(0, 3, n).astype(np.int8),
        images=images,
        valid=valid,
        reasons=reasons,
    )


def meta(mode: str = "asinh") -> dict:
    return {
        "preprocess": {"mode": mode, "upsample": "bilinear", "crop": None},
        "label_rule": "paper",
        "bands": ["VIS", "H"],
        "source": {"images": "s3://raw/Public", "catalog": "s3://raw/Public/image_catalog2.0train.csv"},
    }


def create(url: str, data: Dataset, dtype: str = "float16", **changes) -> None:
    kwargs = dict(
        ids=data.ids,
        labels=data.labels,
        split=data.split,
        channels=CHANNELS,
        size=SIZE,
        dtype=dtype,
        shard_size=SHARD,
        meta=meta(),
    )
    kwargs.update(changes)
    create_store(url, **kwargs)


def write(url: str, data: Dataset, shards: list[int]) -> None:
    for index in shards:
        images, valid, rejects = data.shard(index)
        write_shard(url, index, images, valid, rejects, stats={"nan_pixels": index + 1})


def objects(url: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``url/prefix`` (relative key -> bytes), listed through the filesystem."""
    fs, root = storage.filesystem(url)
    base = f"{root}/{prefix}"
    paths = fs.find(base) if fs.exists(base) else []
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in sorted(paths)}


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return storage.join(request.getfixturevalue("s3_bucket"), "stores", "lenses.zarr")
    return str(tmp_path / "lenses.zarr")


def test_shard_ranges_cover_rows_once() -> None:
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    assert shard_ranges(3, 256) == [(0, 3)]
    with pytest.raises(ValueError):
        shard_ranges(0, 4)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_bit_for_bit_with_shards_out_of_order(store_url: str, dtype: str) -> None:
    data = make_dataset()
    create(store_url, data, dtype=dtype)
    write(store_url, data, [2, 0, 1])
    finalize_store(store_url)

    store = LensStore.open(store_url)
    expected = data.images.astype(dtype)
    rows = store.indices()
    np.testing.assert_array_equal(rows, np.flatnonzero(data.valid))
    got = store.read(rows)
    assert got.dtype == np.dtype(dtype) and got.shape == (len(rows), CHANNELS, SIZE, SIZE)
    assert got.tobytes() == expected[rows].tobytes()
    np.testing.assert_array_equal(store.ids, data.ids)
    np.testing.assert_array_equal(store.labels, data.labels)
    np.testing.assert_array_equal(store.split, data.split)

    # Rejected rows were never written: NaN, not zeros and not the garbage handed in.
    everything = store.read(np.arange(len(data.ids)), allow_invalid=True)
    assert np.isnan(everything[~data.valid]).all()
    assert everything[data.valid].tobytes() == expected[data.valid].tobytes()
    with pytest.raises(StoreError, match=str(data.ids[1])):
        store.read([0, 1])


def test_batched_reads_in_any_order(tmp_path: Path) -> None:
    # 40 rows in 10 shards: dense spans, sparse runs, repeats and unsorted requests all map back right.
    data = make_dataset(n=40, seed=3, rejected_rows=(2, 17))
    url = str(tmp_path / "s.zarr")
    create(url, data, dtype="float32")
    write(url, data, list(range(10)))
    finalize_store(url)
    store = LensStore.open(url)
    ok = np.flatnonzero(data.valid)
    rng = np.random.default_rng(7)
    for request in (ok, ok[::-1], ok[::5], rng.choice(ok, 25), np.array([39, 0, 39, 20, 21, 22, 23, 0]), ok[:0]):
        np.testing.assert_array_equal(store.read(request), data.images[request])
    with pytest.raises(StoreError, match="outside"):
        store.read([40])
    with pytest.raises(StoreError, match="integer"):
        store.read(np.array([1.0, 2.0]))


def test_one_object_per_shard_per_array(store_url: str) -> None:
    data = make_dataset()
    create(store_url, data)
    write(store_url, data, [0, 1, 2])
    images = objects(store_url, "images/c")
    valid = objects(store_url, "valid/c")
    # Chunk keys are images/c/<shard>/0/0/0 and valid/c/<shard>: one object per shard, however many samples.
    assert sorted(images) == [f"images/c/{k}/0/0/0" for k in range(3)]
    assert sorted(valid) == [f"valid/c/{k}" for k in range(3)]
    assert all(len(blob) > SHARD * CHANNELS * SIZE * SIZE for blob in images.values())
    assert sorted(objects(store_url, "shard_reports")) == [f"shard_reports/shard-{k:06d}.json" for k in range(3)]
    for column in ("ids", "labels", "split"):  # written once by the driver: one object each
        assert list(objects(store_url, f"{column}/c")) == [f"{column}/c/0"]


def test_partial_run_then_resume(store_url: str) -> None:
    data = make_dataset(n=14)  # 4 shards; shard 0 and shard 1 hold rejects
    create(store_url, data)
    write(store_url, data, [0, 2])
    assert completed_shards(store_url) == {0, 2}
    with pytest.raises(StoreIncompleteError, match=r"\[1, 3\]"):
        finalize_store(store_url)
    with pytest.raises(StoreIncompleteError, match="not finalized"):
        LensStore.open(store_url).indices()
    assert "NOT FINALIZED: 2 of 4" in LensStore.open(store_url).info()

    before = objects(store_url, "images/c") | objects(store_url, "shard_reports")
    create(store_url, data)  # the rerun: same parameters -> reopened, finished shards kept
    assert completed_shards(store_url) == {0, 2}
    write(store_url, data, [0])  # rewriting a finished shard writes the same bytes
    assert objects(store_url, "images/c") | objects(store_url, "shard_reports") == before
    write(store_url, data, [3, 1])
    assert completed_shards(store_url) == {0, 1, 2, 3}

    final = finalize_store(store_url)
    # Rejects from shard 0, written before the resume, are reported along with shard 1's.
    assert [r["id"] for r in final["rejects"]] == [200002, 200006, 200007]
    assert {r["id"]: r["reason"] for r in final["rejects"]} == data.reasons
    assert final["shard_stats"] == {"nan_pixels": 1 + 2 + 3 + 4}
    store = LensStore.open(store_url)
    assert store.read(store.indices()).tobytes() == data.images[data.valid].astype(np.float16).tobytes()


def test_interrupted_rewrite_leaves_shard_incomplete(tmp_path: Path) -> None:
    data = make_dataset()
    url = str(tmp_path / "s.zarr")
    create(url, data)
    write(url, data, [0, 1, 2])
    report = tmp_path / "s.zarr" / "shard_reports" / "shard-000001.json"
    report.unlink()
    report.mkdir()  # the report can no longer be written: the rewrite fails after the images
    with pytest.raises(OSError):
        write(url, data, [1])
    assert completed_shards(url) == {0, 2}  # never "done" with a half-rewritten shard
    with pytest.raises(StoreIncompleteError, match=r"\[1\]"):
        finalize_store(url)


def test_shard_object_cut_short_by_a_killed_task_is_rewritten(store_url: str) -> None:
    """A task killed while writing leaves the shard's images object cut short and no done mark (a
    non-atomic filesystem; S3 puts are atomic, so there it is the old object): the rerun's write must
    replace it, not merge into it (zarr reads the existing object first, and this one fails its checksum)."""
    data = make_dataset()
    create(store_url, data)
    write(store_url, data, [0, 1, 2])
    before = objects(store_url, "images/c")
    key = "images/c/1/0/0/0"
    storage.write_bytes(storage.join(store_url, key), before[key][: len(before[key]) // 2])
    fs, root = storage.filesystem(store_url)
    fs.rm(f"{root}/shard_done/c/1")  # the done mark, written last, was never set
    with pytest.raises(StoreIncompleteError, match=r"\[1\]"):
        finalize_store(store_url)
    write(store_url, data, [1])
    assert objects(store_url, "images/c") == before
    finalize_store(store_url)
    store = LensStore.open(store_url)
    assert store.read(store.indices()).tobytes() == data.images[data.valid].astype(np.float16).tobytes()


def test_finalize_counts_rejects_and_extra_meta(tmp_path: Path) -> None:
    data = make_dataset(n=30, seed=1, rejected_rows=(0, 9, 10, 29))
    url = str(tmp_path / "s.zarr")
    create(url, data)
    write(url, data, list(range(8)))
    final = finalize_store(url, {"ingest_wall_s": 1.5})
    assert final["ingest_wall_s"] == 1.5
    counts = final["counts"]
    assert (counts["n"], counts["valid"], counts["rejected"]) == (30, 26, 4)
    for name, code in SPLITS.items():
        in_split = data.valid & (data.split == code)
        assert counts[name]["lens"] == int((in_split & (data.labels == 1)).sum())
        assert counts[name]["non-lens"] == int((in_split & (data.labels == 0)).sum())
    assert counts["rejected_by_reason"] == {"all_nan": 2, "missing_image": 2}
    assert final["label_rule"] == "paper" and final["preprocess"]["mode"] == "asinh"
    assert final["created"] <= final["finalized"]

    store = LensStore.open(url)
    assert store.meta == final
    # valid derived from meta (no per-shard reads) equals the valid array the shards wrote
    import zarr

    np.testing.assert_array_equal(store.valid, zarr.open_group(url, mode="r")["valid"][:])
    info = store.info()
    assert "train" in info and "missing_image: 2" in info and str(data.ids[9]) in info
    assert finalize_store(url, {"ingest_wall_s": 1.5})["counts"] == counts  # idempotent
    with pytest.raises(StoreError, match="counts"):
        finalize_store(url, {"counts": {}})


def test_load_split(tmp_path: Path) -> None:
    data = make_dataset(n=20, seed=2, rejected_rows=(3,))
    url = str(tmp_path / "s.zarr")
    create(url, data, dtype="float32")
    write(url, data, list(range(5)))
    finalize_store(url)
    store = LensStore.open(url)
    seen = []
    for name, code in SPLITS.items():
        images, labels, ids = store.load_split(name)
        rows = np.flatnonzero(data.valid & (data.split == code))
        np.testing.assert_array_equal(ids, data.ids[rows])
        np.testing.assert_array_equal(labels, data.labels[rows])
        np.testing.assert_array_equal(images, data.images[rows])
        seen.extend(ids.tolist())
    assert sorted(seen) == data.ids[data.valid].tolist()
    lenses = store.indices("train", label=1)
    np.testing.assert_array_equal(lenses, np.flatnonzero(data.valid & (data.split == 0) & (data.labels == 1)))
    with pytest.raises(StoreError, match="unknown split"):
        store.indices("training")


def test_mismatch_names_the_differing_key(tmp_path: Path) -> None:
    data = make_dataset()
    url = str(tmp_path / "s.zarr")
    create(url, data)
    write(url, data, [1])
    with pytest.raises(StoreMismatchError, match=r"meta\.preprocess\.mode: store has 'asinh', requested 'log'"):
        create(url, data, meta=meta("log"))
    relabelled = np.where(data.labels == 1, 0, 1).astype(np.int8)
    with pytest.raises(StoreMismatchError, match=r"labels: store has 'sha256") as caught:
        create(url, data, labels=relabelled)
    assert "ids:" not in str(caught.value)  # only what differs is named
    with pytest.raises(StoreMismatchError, match=r"layout\.n_shards: store has 3, requested 2") as caught:
        create(url, data, shard_size=5)
    assert "layout.shard_size: store has 4, requested 5" in str(caught.value)
    with pytest.raises(StoreMismatchError, match=r"layout\.dtype: store has 'float16', requested 'float32'"):
        create(url, data, dtype="float32")
    assert completed_shards(url) == {1}  # a refused resume leaves the store untouched


def test_write_shard_rejects_bad_input(tmp_path: Path) -> None:
    data = make_dataset()
    url = str(tmp_path / "s.zarr")
    create(url, data)
    images, valid, rejects = data.shard(1)  # rows 4:8, row 5 (ID 200006) and 6 (ID 200007) rejected
    with pytest.raises(StoreError, match=r"shard 3 out of range.*0\.\.2"):
        write_shard(url, 3, images, valid, rejects)
    with pytest.raises(StoreError, match=r"shard 2 \(rows 8:10\).*shape \(2,\)"):
        write_shard(url, 2, images, valid, rejects)  # a full shard's block into the short last shard
    with pytest.raises(StoreError, match=r"shape \(4, 2, 8, 8\), got \(4, 2, 8, 7\)"):
        write_shard(url, 1, images[..., :7], valid, rejects)
    with pytest.raises(StoreError, match="floating point"):
        write_shard(url, 1, images.astype(np.int32), valid, rejects)
    with pytest.raises(StoreError, match="valid must be bool"):
        write_shard(url, 1, images, valid.astype(np.int8), rejects)
    with pytest.raises(StoreError, match=r"invalid without a reason: \[200007\]"):
        write_shard(url, 1, images, valid, rejects[:1])
    with pytest.raises(StoreError, match=r"not an invalid row of this shard: \[200001\]"):
        write_shard(url, 1, images, valid, [*rejects, {"id": 200001, "reason": "x"}])
    with pytest.raises(StoreError, match="unknown fields"):
        write_shard(url, 1, images, valid, [{**rejects[0], "why": "?"}, rejects[1]])
    nan_pixel = images.copy()
    nan_pixel[3, 1, 2, 2] = np.nan
    with pytest.raises(StoreError, match=r"NaN/inf.*\[200008\]"):
        write_shard(url, 1, nan_pixel, valid, rejects)
    too_big = images.copy()
    too_big[0, 0, 0, 0] = 1e5  # beyond float16: would become inf
    with pytest.raises(StoreError, match=r"float16 range\) for IDs \[200005\]"):
        write_shard(url, 1, too_big, valid, rejects)
    with pytest.raises(StoreError, match="nan_pixels"):
        write_shard(url, 1, images, valid, rejects, stats={"nan_pixels": float("nan")})
    assert completed_shards(url) == set()  # nothing half-written
    assert objects(url, "images/c") == {}


def test_create_validates_inputs(tmp_path: Path) -> None:
    data = make_dataset()
    url = str(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match=r"duplicated: \[200003\]"):
        create(url, data, ids=np.array([*data.ids[:-1], 200003]))
    with pytest.raises(StoreError, match=r"labels\[4\] \(ID 200005\) = 2"):
        create(url, data, labels=np.where(np.arange(10) == 4, 2, data.labels))
    with pytest.raises(StoreError, match=r"lacks \['source'\]"):
        create(url, data, meta={k: v for k, v in meta().items() if k != "source"})
    with pytest.raises(StoreError, match="set by the store"):
        create(url, data, meta={**meta(), "lensray_version": "0"})
    with pytest.raises(StoreError, match=r"meta\.preprocess\.when: datetime"):
        import datetime

        create(url, data, meta={**meta(), "preprocess": {"when": datetime.datetime.now()}})
    with pytest.raises(StoreError, match="float16 or float32"):
        create(url, data, dtype="int16")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not a Zarr store"):
        create(str(foreign), data)
    with pytest.raises(FileNotFoundError, match="no lensray store"):
        LensStore.open(str(tmp_path / "absent.zarr"))


def test_interrupted_creation_is_recreated(tmp_path: Path) -> None:
    import zarr

    url = str(tmp_path / "s.zarr")
    zarr.open_group(url, mode="w", attributes={"state": "creating"})  # the driver died mid-creation
    data = make_dataset()
    create(url, data)
    write(url, data, [0, 1, 2])
    assert finalize_store(url)["counts"]["valid"] == 7


def test_ray_task_reads_s3_store(ray_cluster: None, s3_bucket: str) -> None:
    import ray

    data = make_dataset()
    url = storage.join(s3_bucket, "lenses.zarr")
    create(url, data)
    write(url, data, [0, 1, 2])
    final = finalize_store(url)
    store = LensStore.open(url)
    _ = store.ids, store.valid  # cached columns travel with the pickle; open handles do not
    store.read([0])

    @ray.remote
    def read_in_task(pickled: LensStore, url: str, rows: list[int]) -> tuple[bytes, bytes, str]:
        # Defined here so Ray ships it by value: workers cannot import the test module.
        reopened = LensStore.open(url)
        return pickled.read(rows).tobytes(), reopened.read(rows).tobytes(), json.dumps(reopened.meta["counts"])

    rows = [9, 0, 3]
    from_pickle, from_url, counts = ray.get(read_in_task.remote(store, url, rows))
    expected = data.images[rows].astype(np.float16).tobytes()
    assert from_pickle == expected and from_url == expected
    assert json.loads(counts) == final["counts"]
    assert pickle.loads(pickle.dumps(store)).read(rows).tobytes() == expected


def test_a_store_of_another_format_version_is_named_not_read(tmp_path: Path) -> None:
    import zarr

    url = str(tmp_path / "old.zarr")
    create(url, make_dataset())
    group = zarr.open_group(url, mode="r+")
    group.attrs["layout"] = {**group.attrs["layout"], "format": 0}  # as a future or past lensray would write it
    with pytest.raises(StoreError, match=rf"{url}: store format 0, this lensray reads 1"):
        LensStore.open(url)


def test_a_rerun_removes_what_killed_writes_left_beside_the_objects(tmp_path: Path) -> None:
    """zarr (``<key>.<hex>.partial``) and storage (``.<name>.<hex>.partial``) write local objects aside,
    then rename them: a killed write leaves the temporary file, which the shard's rewrite (and the
    driver's reopen, for the metadata) removes; another shard's are left to that shard's task."""
    data = make_dataset()
    url = str(tmp_path / "s.zarr")
    create(url, data)
    write(url, data, [0, 1, 2])
    root = Path(url)
    leftovers = {
        1: [
            root / "images" / "c" / "1" / "0" / "0" / "0.0123456789abcdef.partial",
            root / "valid" / "c" / "1.0123456789abcdef.partial",
            root / "shard_done" / "c" / "1.0123456789abcdef.partial",
            root / "shard_reports" / ".shard-000001.json.0123456789ab.partial",
        ],
        2: [root / "images" / "c" / "2" / "0" / "0" / "0.fedcba9876543210.partial"],
        "meta": [root / "zarr.0123456789abcdef.partial", root / "images" / "zarr.0123456789abcdef.partial"],
    }
    for path in (path for paths in leftovers.values() for path in paths):
        path.write_bytes(b"cut sh")
    create(url, data)  # the rerun reopens the store
    assert not any(path.exists() for path in leftovers["meta"])
    write(url, data, [1])
    assert not any(path.exists() for path in leftovers[1]) and all(path.exists() for path in leftovers[2])
    write(url, data, [2])
    assert sorted(root.rglob("*.partial")) == []
    finalize_store(url)
    store = LensStore.open(url)
    assert store.read(store.indices()).tobytes() == data.images[data.valid].astype(np.float16).tobytes()
