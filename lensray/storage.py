"""URLs to filesystems: local paths and ``s3://`` (custom endpoint and credentials from the environment).

Every module that touches storage goes through here so that one place knows how an endpoint such as
MinIO, Ceph or moto is reached. The endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
and credentials from the usual ``AWS_*`` variables (or any botocore credential source).
"""

from __future__ import annotations

import functools
import os
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from lensray.errors import StorageError


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def strip_scheme(url: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key``; local paths are made absolute."""
    if is_s3(url):
        return url.split("://", 1)[1].rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    base = url.rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the scheme-less path for ``url``."""
    if is_s3(url):
        client_kwargs = {"region_name": _s3_region()}
        endpoint = s3_endpoint()
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        # A fresh instance: fsspec caches instances, and a cached one may hold a stale event loop
        # after a fork (Ray workers) or a changed endpoint.
        fs = fsspec.filesystem("s3", client_kwargs=client_kwargs, skip_instance_cache=True)
        return fs, strip_scheme(url)
    return fsspec.filesystem("file"), strip_scheme(url)


def arrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``url``: 2-2.5x faster than s3fs for many small object reads."""
    if is_s3(url):
        # Keyed on everything that configures the client, so a changed environment gets a new one.
        settings = (os.getpid(), s3_endpoint(), _s3_region(), *(os.environ.get(k) for k in _AWS_CREDENTIAL_ENV))
        return _arrow_s3(settings), strip_scheme(url)
    return pafs.LocalFileSystem(), strip_scheme(url)


_AWS_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@functools.lru_cache(maxsize=8)
def _arrow_s3(settings: tuple[object, ...]) -> pafs.S3FileSystem:
    # Building an S3FileSystem costs ~1.5 ms, about as much as reading a small object from it.
    # The pid in the key keeps a forked child from reusing its parent's client.
    _, endpoint, region, *_ = settings
    # allow_delayed_open: a small object is one PutObject instead of a three-request multipart upload.
    kwargs: dict[str, object] = {"region": region, "allow_delayed_open": True}
    if endpoint:
        parsed = urlparse(str(endpoint))
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def _missing(url: str, fs: pafs.FileSystem) -> Exception:
    """FileNotFoundError for a missing object; StorageError when its whole S3 bucket is missing.

    pyarrow reports both as FileNotFoundError (a HEAD 404 has no body to tell them apart), but a
    missing bucket is a configuration error for the whole run, not one absent object.
    """
    if is_s3(url):
        bucket = strip_scheme(url).split("/", 1)[0]
        try:
            info = fs.get_file_info(bucket)
        except OSError as exc:
            return StorageError(f"cannot reach bucket {bucket!r} for {url}: {exc}")
        if info.type == pafs.FileType.NotFound:
            return StorageError(
                f"bucket {bucket!r} does not exist (URL {url}, endpoint {s3_endpoint() or 'AWS default'})"
            )
    return FileNotFoundError(f"no such object: {url}")


def read_bytes(url: str) -> bytes:
    """Whole object at ``url``. FileNotFoundError names the URL when it does not exist; StorageError
    when its bucket is missing, credentials are refused or the endpoint cannot be reached."""
    fs, path = arrow_filesystem(url)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise _missing(url, fs) from None
    except OSError as exc:
        if "not found" in str(exc).lower() or "no such" in str(exc).lower():
            raise _missing(url, fs) from None
        raise StorageError(f"cannot read {url}: {exc}") from exc


def exists(url: str) -> bool:
    """Whether an object (or folder) exists at ``url``, without reading it. Like ``read_bytes``, a
    missing bucket, refused credentials or an unreachable endpoint raise StorageError, not False."""
    fs, path = arrow_filesystem(url)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"cannot reach {url}: {exc}") from exc
    if info.type != pafs.FileType.NotFound:
        return True
    missing = _missing(url, fs)
    if isinstance(missing, StorageError):
        raise missing
    return False


def list_folders(url: str) -> list[str]:
    """Names of the folders directly under ``url``, sorted; [] when ``url`` does not exist. StorageError
    (naming the URL) when it cannot be listed."""
    fs, path = arrow_filesystem(url)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {url}: {exc}") from exc
    return sorted(entry.base_name for entry in entries if entry.type == pafs.FileType.Directory)


def write_bytes(url: str, data: bytes) -> None:
    fs, path = arrow_filesystem(url)
    if not is_s3(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as exc:
        raise StorageError(f"cannot write {url}: {exc}") from exc


def check_reachable(url: str, *, must_exist: bool = True) -> None:
    """Fail fast, naming the URL, when its bucket/folder is missing or credentials are refused."""
    if is_s3(url):
        bucket = strip_scheme(url).split("/", 1)[0]
        fs, _ = arrow_filesystem(url)
        try:
            info = fs.get_file_info(bucket)
        except OSError as exc:
            raise StorageError(
                f"cannot reach bucket {bucket!r} for {url} (endpoint {s3_endpoint() or 'AWS default'}): {exc}"
            ) from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {bucket!r} does not exist (URL {url})")
    target = url if must_exist else None
    if target is not None:
        fs, path = arrow_filesystem(target)
        try:
            info = fs.get_file_info(path)
        except OSError as exc:
            raise StorageError(f"cannot reach {url}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{url} does not exist")
