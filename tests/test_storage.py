from __future__ import annotations

from pathlib import Path

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
