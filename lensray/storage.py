"""URLs to filesystems: local paths, ``s3://`` and every other fsspec URL (``gs://``, ``https://``, ``memory://``...).

Every module that touches storage goes through here so that one place knows how a store is reached.
A URL without a scheme (or ``file://``) is a local path; ``s3://`` goes through pyarrow (2-2.5x faster
than s3fs for many small objects), any other scheme through fsspec (its package, e.g. gcsfs for
``gs://``, must be installed). For S3 the endpoint of MinIO, Ceph or moto comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, credentials from the usual ``AWS_*`` variables (or any
botocore credential source); ``AWS_NO_SIGN_REQUEST=YES`` reads public buckets anonymously.

Remote storage that fails transiently (connection refused or reset, timeouts, throttling, 5xx) is
tried again after each delay of ``RETRY_DELAYS_S`` (6 attempts within about 20 s); then StorageError names the URL.
``retrying`` and ``retrying_async`` (for async requests: the Zarr store's) apply that rule to any call.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs

from lensray.errors import LensrayError, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds to wait before each retry: 6 attempts within ~20 s (10.5 s of waits, plus the attempts' own
# time: against a closed port pyarrow's client tries 3 times itself, ~1-2 s) ride out an endpoint restart.
RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(url: str) -> str | None:
    """``s3``, ``gs``, ``memory``, ``file``...; None for a plain path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def is_url(value: str) -> bool:
    """Whether ``value`` is written as a URL (any scheme, ``file://`` too) rather than as a plain path."""
    return scheme(value) is not None


def is_local(url: str) -> bool:
    """A plain path or a ``file://`` URL: this machine's files. Everything else (``s3://``, ``gs://``,
    ``https://``, ``memory://``...) is remote: read through a filesystem, retried, named in errors."""
    return scheme(url) in (None, "file")


def absolute_path(value: str) -> str:
    """A plain path made absolute against the working folder (``~`` expanded); a URL (``file://`` too,
    whose path is absolute) as given."""
    return value if is_url(value) else os.path.abspath(os.path.expanduser(value))


def is_s3(url: str) -> bool:
    return scheme(url) in ("s3", "s3a")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_anonymous() -> bool:
    """``AWS_NO_SIGN_REQUEST=YES`` (the AWS CLI's and GDAL's setting): unsigned requests, no credentials."""
    return os.environ.get("AWS_NO_SIGN_REQUEST", "").strip().lower() in ("yes", "true", "1")


def _s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def strip_scheme(url: str) -> str:
    """The path a filesystem of ``url`` takes: ``s3://bucket/key`` -> ``bucket/key``, ``memory://a`` ->
    ``/a`` (each fsspec scheme its own way); local paths are made absolute."""
    if is_s3(url):
        return url.split("://", 1)[1].rstrip("/")
    if is_local(url):
        if url.startswith("file://"):
            url = url[len("file://") :]
        return os.path.abspath(os.path.expanduser(url))
    return _fsspec_class(url)._strip_protocol(url)


def join(url: str, *parts: str) -> str:
    base = url.rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def _fsspec_class(url: str) -> type[fsspec.AbstractFileSystem]:
    try:
        return fsspec.get_filesystem_class(scheme(url))
    except (ImportError, ValueError) as exc:  # unknown scheme, or its package is not installed
        raise StorageError(f"no filesystem for {scheme(url)}:// URLs ({url}): {exc}") from exc


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the scheme-less path for ``url``."""
    if is_s3(url):
        client_kwargs = {"region_name": _s3_region()}
        endpoint = s3_endpoint()
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        # A fresh instance: fsspec caches instances, and a cached one may hold a stale event loop
        # after a fork (Ray workers) or a changed endpoint.
        fs = fsspec.filesystem("s3", client_kwargs=client_kwargs, anon=s3_anonymous(), skip_instance_cache=True)
        return fs, strip_scheme(url)
    if is_local(url):
        return fsspec.filesystem("file"), strip_scheme(url)
    return _fsspec_class(url)(), strip_scheme(url)


def arrow_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``url``: pyarrow's own for S3 and local paths, fsspec's behind it otherwise."""
    if is_s3(url):
        # Keyed on everything that configures the client, so a changed environment gets a new one.
        env = (os.environ.get(k) for k in _AWS_CREDENTIAL_ENV)
        settings = (os.getpid(), s3_endpoint(), _s3_region(), s3_anonymous(), *env)
        return _arrow_s3(settings), strip_scheme(url)
    if is_local(url):
        return pafs.LocalFileSystem(), strip_scheme(url)
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


_AWS_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@functools.lru_cache(maxsize=8)
def _arrow_s3(settings: tuple[object, ...]) -> pafs.S3FileSystem:
    # Building an S3FileSystem costs ~1.5 ms, about as much as reading a small object from it.
    # The pid in the key keeps a forked child from reusing its parent's client.
    _, endpoint, region, anonymous, *_ = settings
    # allow_delayed_open: a small object is one PutObject instead of a three-request multipart upload.
    # background_writes=False: uploads run in the calling thread. Ray's copy_files calls the retrying
    # filesystem from pyarrow's IO pool; background uploads then waited for that same full pool, for good.
    kwargs: dict[str, object] = {
        "region": region,
        "allow_delayed_open": True,
        "anonymous": bool(anonymous),
        "background_writes": False,
    }
    if endpoint:
        parsed = urlparse(str(endpoint))
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def retrying_filesystem(url: str) -> pafs.FileSystem:
    """``arrow_filesystem(url)``'s filesystem with every request under ``retrying``'s rule, for code that
    is not lensray's (Ray Train and Tune persist checkpoints and their own state through it).

    Ray's own retry covers only the checkpoint upload (3 attempts within ~3 s, on AWS error texts), not
    the controller's state file nor the storage checks each worker makes; through this filesystem an
    endpoint restart is waited out and one that stays down ends in StorageError naming the object.
    """
    return pafs.PyFileSystem(_RetryingHandler(url))


class _RetryingHandler(pafs.FileSystemHandler):
    """Each call of the wrapped pyarrow filesystem retried whole. Files are read whole and written whole
    (one request when closed), so a retry never repeats part of a stream. Pickled (for Ray's workers)
    as the URL: each process builds its own client from its environment."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._scheme = scheme(url) or "file"
        self._fs: pafs.FileSystem | None = None

    def __getstate__(self) -> dict[str, object]:
        return {"url": self.url, "_scheme": self._scheme, "_fs": None}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RetryingHandler) and other.url == self.url

    def __ne__(self, other: object) -> bool:
        return not self == other

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = arrow_filesystem(self.url)[0]
        return self._fs

    def _url(self, path: str) -> str:
        return path if "://" in path else f"{self._scheme}://{path.lstrip('/')}"

    def _retry(self, action: str, path: str, attempt: Callable[[], T]) -> T:
        return retrying(action, self._url(path), attempt)

    def get_type_name(self) -> str:
        return f"lensray-retrying+{self._scheme}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retry("reach", paths[0] if len(paths) == 1 else self.url, lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry("list", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry("write", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry("delete", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry("delete", path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise StorageError(f"refusing to delete everything under the root of {self.url}")

    def delete_file(self, path: str) -> None:
        self._retry("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._retry("move", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retry("copy", src, lambda: self.fs.copy_file(src, dest))

    def _read(self, path: str) -> pa.BufferReader:
        def attempt() -> bytes:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()

        return pa.BufferReader(self._retry("read", path, attempt))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._read(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._read(path)

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        return pa.PythonFile(_WholeUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        raise StorageError(f"cannot append to {self._url(path)}: objects are written whole")


class _WholeUpload(io.BytesIO):
    """An output stream that writes the object in one retried request when closed: a failed write
    publishes nothing, and a retry sends the whole object again."""

    def __init__(self, handler: _RetryingHandler, path: str, metadata: dict[str, str] | None) -> None:
        super().__init__()
        self._handler, self._path, self._metadata = handler, path, metadata

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        super().close()

        def attempt() -> None:
            with self._handler.fs.open_output_stream(self._path, metadata=self._metadata) as stream:
                stream.write(data)

        self._handler._retry("write", self._path, attempt)


# --- transient failures -------------------------------------------------------------------------------

# Exception class names (anywhere in the MRO) of network failures: botocore, aiohttp, urllib3, asyncio.
_TRANSIENT_TYPES = frozenset(
    {
        "ConnectionError",
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "IncompleteRead",
        "ProtocolError",
        "TimeoutError",
        "FSTimeoutError",
    }
)
# pyarrow reports every S3 failure as OSError; these words in its text mark a transient one.
_TRANSIENT_TEXT = re.compile(
    r"network_connection|curlcode|could ?n[o']t connect|connection (refused|reset|aborted|closed)|broken pipe"
    r"|timed? ?out|slow_?down|service_?unavailable|internal_?(failure|error)|throttl|http status 5\d\d"
)


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the connection or service that may pass: worth trying again."""
    if isinstance(exc, (LensrayError, FileNotFoundError, PermissionError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _TRANSIENT_TYPES for cls in type(exc).__mro__):
        return True
    return bool(_TRANSIENT_TEXT.search(str(exc).lower()))


def retrying(action: str, url: str, attempt: Callable[[], T]) -> T:
    """``attempt()``; for remote URLs, again after each of RETRY_DELAYS_S while it fails transiently.

    FileNotFoundError and lensray's own errors pass unchanged; any other OSError (and a transient
    failure that outlasts the retries) becomes StorageError naming the URL.
    """
    delays = () if is_local(url) else RETRY_DELAYS_S
    for tried in itertools.count(1):
        try:
            return attempt()
        except Exception as exc:
            delay = _next_delay(action, url, exc, tried, delays)
            if delay is None:
                raise
        time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


async def retrying_async(action: str, url: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """``retrying`` for a coroutine (an async filesystem's request, e.g. a Zarr store's): the same
    schedule, the same errors, and the event loop stays free while it waits."""
    delays = () if is_local(url) else RETRY_DELAYS_S
    for tried in itertools.count(1):
        try:
            return await attempt()
        except Exception as exc:
            delay = _next_delay(action, url, exc, tried, delays)
            if delay is None:
                raise
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _next_delay(action: str, url: str, exc: Exception, tried: int, delays: tuple[float, ...]) -> float | None:
    """Seconds to wait before attempt ``tried + 1`` after ``exc``; None when ``exc`` is to pass unchanged.

    Raises StorageError naming the URL for an OSError that is no transient failure, and for a transient
    one once every delay is spent.
    """
    if isinstance(exc, (LensrayError, FileNotFoundError)):
        return None
    transient = _transient(exc)
    if not transient and not isinstance(exc, OSError):
        return None
    if not transient:
        raise StorageError(f"cannot {action} {url}: {exc}") from exc
    if tried > len(delays):
        waited = sum(delays)
        message = f"cannot {action} {url}: still unreachable after {tried} attempts over {waited:.0f} s: {exc}"
        raise StorageError(message) from exc
    if tried == 1:
        log.warning(
            "%s unreachable (%s); retrying %d times over %.0f s", url, _first_line(exc), len(delays), sum(delays)
        )
    return delays[tried - 1]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --- reading and writing ------------------------------------------------------------------------------


def _missing(url: str, fs: pafs.FileSystem) -> Exception:
    """FileNotFoundError for a missing object; StorageError when its whole S3 bucket is missing.

    pyarrow reports both as FileNotFoundError (a HEAD 404 has no body to tell them apart), but a
    missing bucket is a configuration error for the whole run, not one absent object. A transient
    failure of the bucket check is raised as it is, for the caller's retry.
    """
    if is_s3(url):
        bucket = strip_scheme(url).split("/", 1)[0]
        try:
            info = fs.get_file_info(bucket)
        except OSError as exc:
            if _transient(exc):
                raise
            return StorageError(f"cannot reach bucket {bucket!r} for {url}: {exc}")
        if info.type == pafs.FileType.NotFound:
            return StorageError(
                f"bucket {bucket!r} does not exist (URL {url}, endpoint {s3_endpoint() or 'AWS default'})"
            )
    return FileNotFoundError(f"no such object: {url}")


def read_bytes(url: str) -> bytes:
    """Whole object at ``url``. FileNotFoundError names the URL when it does not exist; StorageError
    when its bucket is missing, credentials are refused or the endpoint stays unreachable."""
    fs, path = arrow_filesystem(url)

    def attempt() -> bytes:
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise _missing(url, fs) from None
        except OSError as exc:
            if "not found" in str(exc).lower() or "no such" in str(exc).lower():
                raise _missing(url, fs) from None
            raise

    return retrying("read", url, attempt)


def exists(url: str) -> bool:
    """Whether an object (or folder) exists at ``url``, without reading it. Like ``read_bytes``, a
    missing bucket, refused credentials or an unreachable endpoint raise StorageError, not False."""
    fs, path = arrow_filesystem(url)

    def attempt() -> bool:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return True
        missing = _missing(url, fs)
        if isinstance(missing, StorageError):
            raise missing
        return False

    return retrying("reach", url, attempt)


def list_folders(url: str) -> list[str]:
    """Names of the folders directly under ``url``, sorted; [] when ``url`` does not exist. StorageError
    (naming the URL) when it cannot be listed."""
    fs, path = arrow_filesystem(url)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    entries = retrying("list", url, lambda: fs.get_file_info(selector))
    return sorted(entry.base_name for entry in entries if entry.type == pafs.FileType.Directory)


def write_bytes(url: str, data: bytes) -> None:
    """Write the whole object at ``url``, or fail with StorageError: never a partial object under its name
    (a local file is written aside and renamed; an object store publishes an object only once complete)."""
    if is_local(url):
        _write_local(url, data)
        return
    fs, path = arrow_filesystem(url)

    def attempt() -> None:
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    retrying("write", url, attempt)


def _write_local(url: str, data: bytes) -> None:
    path = strip_scheme(url)
    # Written aside under a hidden name, then renamed: a killed writer leaves no partial file at ``path``.
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.partial")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(partial, "xb") as stream:
                stream.write(data)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    except OSError as exc:
        raise StorageError(f"cannot write {url}: {exc}") from exc


def check_reachable(url: str, *, must_exist: bool = True) -> None:
    """Fail fast, naming the URL, when its bucket/folder is missing or credentials are refused (after
    the retries when the endpoint does not answer)."""
    if is_s3(url):
        retrying("reach", url, lambda: _check_bucket(url))
    elif not is_local(url):
        _fsspec_class(url)  # an unknown scheme, or one whose package is missing: StorageError naming the URL
    if must_exist:
        fs, path = arrow_filesystem(url)
        if retrying("reach", url, lambda: fs.get_file_info(path)).type == pafs.FileType.NotFound:
            raise StorageError(f"{url} does not exist")


def _check_bucket(url: str) -> None:
    bucket = strip_scheme(url).split("/", 1)[0]
    fs, _ = arrow_filesystem(url)
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        if _transient(exc):
            raise
        endpoint = s3_endpoint() or "AWS default"
        raise StorageError(f"cannot reach bucket {bucket!r} for {url} (endpoint {endpoint}): {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket {bucket!r} does not exist (URL {url})")
