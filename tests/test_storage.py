from __future__ import annotations

import contextlib
import io
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest

from lensray import storage


def test_local_write_then_read(tmp_path: Path) -> None:
    url = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(url, b"lens")
    assert storage.read_bytes(url) == b"lens"
    storage.check_reachable(str(tmp_path / "a"))


def test_s3_write_then_read(s3_bucket: str) -> None:
    url = storage.join(s3_bucket, "prefix", "obj.bin")
    storage.write_bytes(url, b"arc" * 1000)
    assert storage.read_bytes(url) == b"arc" * 1000
    fs, path = storage.filesystem(url)  # the fsspec view sees the same object
    assert fs.cat_file(path) == b"arc" * 1000


def test_missing_object_names_the_url(s3_bucket: str, tmp_path: Path) -> None:
    for url in (storage.join(s3_bucket, "nope.fits"), str(tmp_path / "nope.fits")):
        with pytest.raises(FileNotFoundError, match="nope.fits"):
            storage.read_bytes(url)


def test_missing_bucket_fails_fast_naming_it(s3_server: str) -> None:
    with pytest.raises(storage.StorageError, match="no-such-bucket-xyz"):
        storage.check_reachable("s3://no-such-bucket-xyz/data")


def test_missing_local_root_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_reachable(str(tmp_path / "absent"))


def test_join_and_strip_scheme() -> None:
    assert storage.join("s3://b/p/", "EUC_VIS", "x.fits") == "s3://b/p/EUC_VIS/x.fits"
    assert storage.strip_scheme("s3://b/p/") == "b/p"
    assert storage.strip_scheme("file:///tmp/x") == "/tmp/x"


def test_exists_without_reading_and_a_missing_bucket_is_an_error(s3_bucket: str, tmp_path: Path) -> None:
    for root in (s3_bucket, str(tmp_path)):
        url = storage.join(root, "run", "history.json")
        assert not storage.exists(url)
        storage.write_bytes(url, b"[]")
        assert storage.exists(url) and storage.exists(storage.join(root, "run"))
    with pytest.raises(storage.StorageError, match="no-such-bucket-xyz"):
        storage.exists("s3://no-such-bucket-xyz/run/history.json")


# --- other URL schemes ----------------------------------------------------------------------------------


@pytest.fixture()
def memory_root() -> Iterator[str]:
    """A fresh folder on fsspec's in-process memory filesystem, removed afterwards."""
    root = f"memory://lensray-test-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(storage.strip_scheme(root)):
        fs.rm(storage.strip_scheme(root), recursive=True)


def test_url_schemes_other_than_s3_are_not_local_paths() -> None:
    for url in ("memory://b/k", "gs://b/k", "https://example.org/x.fits", "s3a://b/k", "file:///tmp/x"):
        assert storage.scheme(url) == url.split("://")[0]
        assert storage.is_local(url) == url.startswith("file://")
    assert storage.scheme("data/x.fits") is None and storage.is_local("data/x.fits")
    assert storage.strip_scheme("memory://b/k") == "/b/k"
    assert storage.strip_scheme("https://example.org/x.fits") == "https://example.org/x.fits"
    with pytest.raises(storage.StorageError, match="nosuchscheme://b/k"):
        storage.read_bytes("nosuchscheme://b/k")


def test_memory_urls_read_write_list_through_fsspec(memory_root: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a URL taken for a relative path would land here
    url = storage.join(memory_root, "run", "epoch_1", "history.json")
    assert not storage.exists(url)
    storage.write_bytes(url, b"[1]")
    assert storage.read_bytes(url) == b"[1]"
    assert storage.exists(url) and storage.exists(storage.join(memory_root, "run"))
    assert storage.list_folders(storage.join(memory_root, "run")) == ["epoch_1"]
    assert fsspec.filesystem("memory").cat_file(storage.strip_scheme(url)) == b"[1]"
    fs, path = storage.filesystem(url)
    assert fs.cat_file(path) == b"[1]"
    storage.check_reachable(storage.join(memory_root, "run"))
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(storage.join(memory_root, "nope.bin"))
    assert list(tmp_path.iterdir()) == [], "nothing may be written to a local folder named after the URL"


# --- anonymous S3 -----------------------------------------------------------------------------------------


def test_anonymous_s3_reads_public_objects_without_credentials(s3_bucket: str, s3_server: str, monkeypatch) -> None:
    import boto3

    bucket = storage.strip_scheme(s3_bucket)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="public/x.fits", Body=b"open", ACL="public-read")
    client.put_object(Bucket=bucket, Key="private/x.fits", Body=b"closed")
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    public, private = storage.join(s3_bucket, "public", "x.fits"), storage.join(s3_bucket, "private", "x.fits")
    assert storage.read_bytes(public) == b"open" and storage.exists(public)
    fs, path = storage.filesystem(public)
    assert fs.cat_file(path) == b"open"
    # moto refuses an unsigned request for a private object: proof that these requests were unsigned.
    with pytest.raises(storage.StorageError, match=re.escape(private)):
        storage.read_bytes(private)


# --- the endpoint going away ----------------------------------------------------------------------------


class Outage:
    """A moto S3 server of this test's own on a loopback port, to stop and restart (its data survives:
    moto keeps it in this process)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.restarts: list[threading.Thread] = []

    def down_for(self, seconds: float) -> threading.Thread:
        """Stop the server now and start it again after ``seconds``, in the background."""
        self.server.stop()

        def restart() -> None:
            time.sleep(seconds)
            self.server.start()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        self.restarts.append(thread)
        return thread

    def close(self) -> None:
        for thread in self.restarts:  # a restart still pending would leave a server that stop() never joins
            thread.join()
        with contextlib.suppress(Exception):
            self.server.stop()


@pytest.fixture()
def outage(s3_server: str, monkeypatch) -> Iterator[tuple[Outage, str]]:
    """(the server, a fresh bucket on it as an s3:// URL), with lensray pointed at that server."""
    import boto3

    server = Outage()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    bucket = f"outage-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield server, f"s3://{bucket}"
    finally:
        server.close()


def _timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_each_storage_call_rides_out_an_endpoint_restart(outage: tuple[Outage, str]) -> None:
    server, bucket = outage
    url = storage.join(bucket, "run", "epoch_3", "history.json")
    storage.write_bytes(url, b"[3]")
    calls = {
        "read_bytes": (lambda: storage.read_bytes(url), b"[3]"),
        "exists": (lambda: storage.exists(url), True),
        "list_folders": (lambda: storage.list_folders(storage.join(bucket, "run")), ["epoch_3"]),
        "check_reachable": (lambda: storage.check_reachable(url), None),
        "write_bytes": (lambda: storage.write_bytes(storage.join(bucket, "new.json"), b"{}"), None),
    }
    for name, (call, expected) in calls.items():
        restart = server.down_for(2.0)
        result, took = _timed(call)
        restart.join()
        assert result == expected, name
        assert 1.5 < took < 15, f"{name}: {took:.1f} s (it must wait for the restart, and not much longer)"
    assert storage.read_bytes(storage.join(bucket, "new.json")) == b"{}"


def test_an_endpoint_that_stays_down_ends_in_one_storage_error_naming_the_url(outage: tuple[Outage, str]) -> None:
    server, bucket = outage
    url = storage.join(bucket, "store.zarr", "shard_reports", "shard-000000.json")
    server.server.stop()
    waited = sum(storage.RETRY_DELAYS_S)
    expected = (
        re.escape(url) + f".*still unreachable after {len(storage.RETRY_DELAYS_S) + 1} attempts over {waited:.0f} s"
    )
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match=expected) as info:
        storage.write_bytes(url, b"{}")
    took = time.monotonic() - started
    assert waited <= took < waited + 15, f"gave up after {took:.1f} s"
    assert "\n" not in str(info.value), "one line for the CLI"
    server.server.start()
    assert not storage.exists(url), "a write that failed leaves no object behind"


def test_refusals_are_not_retried(outage: tuple[Outage, str]) -> None:
    _, bucket = outage
    for call, error in (
        (lambda: storage.read_bytes(storage.join(bucket, "absent.fits")), FileNotFoundError),
        (lambda: storage.read_bytes("s3://no-such-bucket-xyz/a.fits"), storage.StorageError),
        (lambda: storage.check_reachable("s3://no-such-bucket-xyz/data"), storage.StorageError),
    ):
        started = time.monotonic()
        with pytest.raises(error):
            call()
        assert time.monotonic() - started < 2, "a missing object or bucket is an answer, not an outage"


def test_an_ingest_reads_its_cutouts_and_catalogue_through_an_endpoint_restart(outage: tuple[Outage, str]) -> None:
    """End to end through an ingest's reading stage (sky.fits.read_cutouts, sky.catalog.read_catalog):
    the server goes down just before, comes back 3 s later, and every cutout reads back bit for bit."""
    from astropy.io import fits

    from lensray.sky.bands import band_relpath
    from lensray.sky.fits import read_cutouts

    server, bucket = outage
    root, rng = storage.join(bucket, "Public"), np.random.default_rng(7)
    expected = {}
    for object_id in range(200001, 200009):
        for band, size in (("VIS", 200), ("H", 66)):  # the challenge sizes
            image = rng.normal(1e-11, 3e-12, (size, size)).astype(np.float32)
            buffer = io.BytesIO()
            fits.PrimaryHDU(image).writeto(buffer)
            storage.write_bytes(storage.join(root, band_relpath(band, object_id)), buffer.getvalue())
            expected[object_id, band] = image
    restart = server.down_for(3.0)
    (cutouts, rejects), took = _timed(lambda: read_cutouts(root, list(range(200001, 200009)), ("VIS", "H")))
    restart.join()
    assert rejects == [] and took > 2.5
    for cutout in cutouts:
        for band, image in cutout.bands.items():
            np.testing.assert_array_equal(image, expected[cutout.object_id, band])


# --- a Zarr store on an endpoint that goes away --------------------------------------------------------

STORE_SHARD, STORE_SHAPE = 4, (2, 8, 8)


def _store_images(n: int = 12) -> np.ndarray:
    return np.random.default_rng(3).normal(0, 3, (n, *STORE_SHAPE)).astype(np.float32)


def _create_store(url: str, n: int = 12) -> None:
    from lensray.ingest.store import create_store

    create_store(
        url,
        ids=np.arange(300001, 300001 + n),
        labels=np.zeros(n, np.int8),
        split=np.zeros(n, np.int8),
        channels=STORE_SHAPE[0],
        size=STORE_SHAPE[1],
        shard_size=STORE_SHARD,
        meta={"preprocess": {}, "label_rule": "paper", "bands": ["VIS", "H"], "source": {}},
    )


def _write_shard(url: str, images: np.ndarray, index: int) -> None:
    from lensray.ingest.store import write_shard

    rows = slice(index * STORE_SHARD, (index + 1) * STORE_SHARD)
    write_shard(url, index, images[rows], np.ones(STORE_SHARD, bool), [])


def test_a_store_write_and_read_ride_out_an_endpoint_restart(outage: tuple[Outage, str]) -> None:
    """The Zarr store reaches S3 through s3fs, not through storage's calls: it must retry as they do.
    (botocore's own retries alone gave up after 2-15 s, at random.)"""
    from lensray.ingest.store import LensStore, completed_shards, finalize_store

    server, bucket = outage
    url, images = storage.join(bucket, "lenses.zarr"), _store_images()
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no lensray store at"):
        LensStore.open(url)
    assert time.monotonic() - started < 2, "a missing store is an answer, not an outage"
    _create_store(url)
    _write_shard(url, images, 0)
    restart = server.down_for(5.0)
    _, took = _timed(lambda: _write_shard(url, images, 1))
    restart.join()
    assert took > 4.5, f"{took:.1f} s: the write cannot have finished while the server was down"
    _write_shard(url, images, 2)
    assert completed_shards(url) == {0, 1, 2}
    finalize_store(url)
    store = LensStore.open(url)
    restart = server.down_for(5.0)
    got, took = _timed(lambda: store.read(np.arange(12)))
    restart.join()
    assert took > 4.5
    assert got.tobytes() == images.astype(np.float16).tobytes(), "every shard reads back bit for bit"


def test_a_store_write_to_an_endpoint_that_stays_down_is_one_storage_error_and_no_done_shard(
    outage: tuple[Outage, str],
) -> None:
    from lensray.ingest.store import completed_shards, finalize_store

    server, bucket = outage
    url, images = storage.join(bucket, "lenses.zarr"), _store_images()
    _create_store(url)
    _write_shard(url, images, 0)
    server.server.stop()
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match=re.escape(url) + r".*shard 1\b") as info:
        _write_shard(url, images, 1)
    took = time.monotonic() - started
    waited = sum(storage.RETRY_DELAYS_S)
    assert waited <= took < waited + 15, f"gave up after {took:.1f} s"
    assert "\n" not in str(info.value), "one line for the CLI"
    server.server.start()
    assert completed_shards(url) == {0}, "the shard whose write failed is not complete"
    for index in (1, 2):  # the rerun after the endpoint is back
        _write_shard(url, images, index)
    assert finalize_store(url)["counts"]["valid"] == 12


# --- one rule for URLs; Ray's filesystem --------------------------------------------------------------


def test_one_rule_for_urls_and_local_paths(tmp_path: Path, monkeypatch) -> None:
    from lensray import config

    monkeypatch.chdir(tmp_path)
    for url in ("s3://b/k", "gs://b/k", "memory://b/k", "https://example.org/x", "file:///abs/k"):
        assert storage.is_url(url) and config.is_url(url) and storage.absolute_path(url) == url
    assert storage.is_local("file:///abs/k") and not storage.is_local("memory://b/k")
    assert storage.absolute_path("rel/k") == str(tmp_path / "rel" / "k") and not storage.is_url("rel/k")
    assert config.absolute_path is storage.absolute_path
    # A file:// URL and its plain path name the same file, for configs too.
    (tmp_path / "run.yaml").write_text("train:\n  epochs: 3\n")
    assert config.read_yaml(f"file://{tmp_path}/run.yaml") == config.read_yaml(str(tmp_path / "run.yaml"))
    assert config.relative_url(f"file://{tmp_path}/tune/t.yaml", "../run.yaml") == f"file://{tmp_path}/run.yaml"


def test_configs_read_from_memory_urls(memory_root: str) -> None:
    from lensray import config

    storage.write_bytes(storage.join(memory_root, "configs", "run.yaml"), b"train:\n  epochs: 4\n")
    assert config.read_yaml(storage.join(memory_root, "configs", "run.yaml")) == {"train": {"epochs": 4}}
    assert config.relative_url(storage.join(memory_root, "tune", "t.yaml"), "../configs/run.yaml") == storage.join(
        memory_root, "configs", "run.yaml"
    )


def test_an_unknown_scheme_fails_fast_naming_the_url() -> None:
    from lensray.cli import check_buckets

    for call in (
        lambda: storage.check_reachable("nosuchscheme://b/k", must_exist=False),
        lambda: check_buckets(["/tmp/local", "nosuchscheme://b/k/store.zarr"]),
    ):
        with pytest.raises(storage.StorageError, match=re.escape("nosuchscheme://b/k")):
            call()
    check_buckets(["memory://b/k", "file:///tmp/x", "relative/path"])  # reachable: no error


def test_retrying_filesystem_copies_folders_like_ray_does(memory_root: str, tmp_path: Path) -> None:
    """Ray Train persists checkpoints with pyarrow.fs.copy_files through the filesystem it is given."""
    import pickle

    import pyarrow.fs as pafs

    source = tmp_path / "checkpoint"
    (source / "sub").mkdir(parents=True)
    (source / "state.pt").write_bytes(b"w" * 3000)
    (source / "sub" / "epoch.json").write_bytes(b'{"epoch": 1}')
    fs = pickle.loads(pickle.dumps(storage.retrying_filesystem(memory_root)))  # as Ray's workers get it
    destination = storage.strip_scheme(storage.join(memory_root, "run", "checkpoint_1"))
    fs.create_dir(destination)
    pafs.copy_files(str(source), destination, destination_filesystem=fs)
    url = storage.join(memory_root, "run", "checkpoint_1")
    assert storage.read_bytes(storage.join(url, "state.pt")) == b"w" * 3000
    assert storage.read_bytes(storage.join(url, "sub", "epoch.json")) == b'{"epoch": 1}'
    back = tmp_path / "back"
    pafs.copy_files(destination, str(back), source_filesystem=fs)
    assert (back / "state.pt").read_bytes() == b"w" * 3000
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(destination + "/absent")


COPY_MANY_FILES = """
import sys, pathlib, pyarrow as pa, pyarrow.fs as pafs
from lensray import storage
source, url = pathlib.Path(sys.argv[1]), sys.argv[2]
for k in range(3 * pa.io_thread_count()):
    (source / f"part-{k}.bin").write_bytes(bytes([k % 256]) * 2000)
fs = storage.retrying_filesystem(url)
destination = storage.strip_scheme(storage.join(url, "checkpoint_1"))
pafs.copy_files(str(source), destination, destination_filesystem=fs)  # pyarrow's IO threads, as Ray uploads
(source.parent / "back").mkdir()
pafs.copy_files(destination, str(source.parent / "back"), source_filesystem=fs)  # and back, as Ray restores
storage.write_bytes(storage.join(url, "after.json"), b"{}")
"""


def test_retrying_filesystem_copies_more_files_than_pyarrow_has_io_threads(s3_bucket: str, tmp_path: Path) -> None:
    """Ray uploads a checkpoint with copy_files on pyarrow's IO thread pool; each file's write through the
    retrying filesystem must not need a thread of that same pool (with S3 background writes, 8 or more files
    filled the pool with writes waiting for it, and the driver hung for good)."""
    source = tmp_path / "checkpoint"
    source.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", COPY_MANY_FILES, str(source), storage.join(s3_bucket, "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    n_files = len(list(source.iterdir()))
    for k in (0, n_files - 1):
        url = storage.join(s3_bucket, "run", "checkpoint_1", f"part-{k}.bin")
        assert storage.read_bytes(url) == bytes([k % 256]) * 2000
        assert (tmp_path / "back" / f"part-{k}.bin").read_bytes() == bytes([k % 256]) * 2000


def test_retrying_filesystem_rides_out_an_endpoint_restart_and_names_the_url(outage: tuple[Outage, str]) -> None:
    server, bucket = outage
    fs = storage.retrying_filesystem(bucket)
    path = storage.strip_scheme(storage.join(bucket, "run", "checkpoint_manager_snapshot.json"))
    restart = server.down_for(3.0)

    def write() -> None:
        with fs.open_output_stream(path) as stream:
            stream.write(b"{}")

    _, took = _timed(write)
    restart.join()
    assert took > 2.5 and storage.read_bytes(f"s3://{path}") == b"{}"
    server.server.stop()
    with pytest.raises(storage.StorageError, match=re.escape(f"s3://{path}") + ".*still unreachable"):
        fs.open_input_stream(path)
    server.server.start()


def test_one_warning_per_retried_request(outage: tuple[Outage, str], caplog: pytest.LogCaptureFixture) -> None:
    """A request that waits out an outage warns once, naming its URL: neither its later attempts nor the
    layers around it (the Zarr store's requests go through retrying_async, storage's through retrying)
    repeat the warning."""
    from lensray.ingest.store import LensStore, finalize_store

    server, bucket = outage
    url, store_url = storage.join(bucket, "a.json"), storage.join(bucket, "lenses.zarr")
    storage.write_bytes(url, b"{}")
    _create_store(store_url)
    for index in range(3):
        _write_shard(store_url, _store_images(), index)
    finalize_store(store_url)
    store = LensStore.open(store_url)
    for call in (lambda: storage.read_bytes(url), lambda: store.read(np.arange(12))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lensray"):
            restart = server.down_for(3.0)
            call()
            restart.join()
        warned = [r.getMessage().split(" unreachable", 1)[0] for r in caplog.records if "retrying" in r.getMessage()]
        assert warned and len(warned) == len(set(warned)), warned
        assert all(name.startswith(bucket + "/") for name in warned), warned


# --- the lensray error inside Ray's wrappers (errors.find_cause: cli.reportable and the trainer) ------------


def test_the_lensray_error_is_found_inside_rays_wrappers_also_when_only_its_text_came_back() -> None:
    from ray.exceptions import RayTaskError, UserCodeException

    from lensray.cli import reportable
    from lensray.errors import StorageError, find_cause, is_ray_wrapper, root_cause

    try:
        try:
            raise OSError("curlCode: 7, Could not connect")
        except OSError as exc:
            raise StorageError("cannot read s3://b/raw/x.fits: still unreachable") from exc
    except StorageError as exc:
        error = exc
    # A task's error: Ray keeps the object (RayTaskError(StorageError) is a wrapper, its cause the error).
    wrapped = RayTaskError("read", "Traceback ...", error).as_instanceof_cause()
    assert is_ray_wrapper(wrapped) and not is_ray_wrapper(error)
    assert reportable(wrapped) is error and root_cause(wrapped) is error
    # Ray Data's UDF error: the driver gets UserCodeException and the worker's traceback as text only.
    text = (
        "Traceback (most recent call last):\n  ...\nOSError: curlCode: 7\n\nThe above exception was the direct "
        "cause of the following exception:\n\nTraceback (most recent call last):\n  ...\n"
        "lensray.errors.StorageError: cannot read s3://b/raw/x.fits: still unreachable\n"
    )
    udf = RayTaskError("MapWorker.submit", text, UserCodeException("UDF failed")).as_instanceof_cause()
    found = reportable(udf)
    assert type(found) is StorageError and str(found) == "cannot read s3://b/raw/x.fits: still unreachable"
    assert find_cause(udf, (FileNotFoundError,)) is None
    # Only lensray's own classes are rebuilt from text; anything else stays a bug with its traceback.
    for name in ("ValueError", "Interrupted_", "re"):
        other = RayTaskError("f", f"lensray.errors.{name}: x\n", UserCodeException("UDF failed"))
        assert reportable(other.as_instanceof_cause()) is None, name
    assert type(root_cause(RayTaskError("f", "ValueError: bug", ValueError("bug")).as_instanceof_cause())) is ValueError
