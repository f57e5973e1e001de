"""The preprocessed data set: one Zarr v3 store, written whole shard by whole shard, read in batches.

Layout under the store URL (a local path or ``s3://bucket/prefix``)::

    images        (N, C, H, W) float16 | float32, fill NaN. Chunk = one sample (random access),
                  shard = ``shard_size`` samples: one ingest shard is ONE object.
    ids           (N,) int64  } written once by the driver at creation; chunk = ``shard_size``,
    labels        (N,) int8   } one shard spanning the array, so each is one object read in one
    split         (N,) int8   } request. labels: 1 lens, 0 non-lens, -1 unlabelled; split: SPLITS.
    valid         (N,) bool   chunk = ``shard_size``: each ingest task writes only its own chunk.
    shard_done    (n_shards,) int8, chunk = 1: set to 1 by a shard's task after everything else.
    shard_reports/shard-000012.json   the shard's rejects and counters.
    root attributes: ``state`` (creating | ready | finalized), ``layout``, ``fingerprint``, ``meta``
                  (``meta["profile"]``: the survey profile ingested, read back as ``LensStore.profile``).

Ingest protocol: the driver calls ``create_store`` (or reopens a store with the same fingerprint to
resume), one task per shard calls ``write_shard`` for shards not in ``completed_shards``, then the
driver calls ``finalize_store``. No task ever writes an object another task writes: S3 has no
partial writes, so two writers of one shard object (or of the root attributes) silently lose data.
That is why each shard's rejects live in their own small JSON object rather than in shared
attributes; and because those objects stay beside the arrays, a resumed run that skips complete
shards still reports every reject when it finalizes.

On object storage every request is retried like ``lensray.storage``'s own (``RETRY_DELAYS_S``, about
20 s); an endpoint that stays down ends in one StorageError naming the URL (and the shard, for a shard
write), and a shard whose write failed keeps its done mark unset.

After finalization ``meta["rejects"]`` lists exactly the rows whose ``valid`` is False (checked by
``finalize_store``), so readers derive ``valid`` from ``ids`` and ``meta`` without reading one
object per shard.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import glob
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow.fs as pafs
import zarr
import zarr.errors
from zarr.abc.store import ByteRequest, Store
from zarr.buffer.cpu import NDBuffer
from zarr.codecs import BloscCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import sync as zarr_sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from lensray import storage
from lensray._version import __version__
from lensray.errors import StorageError, StoreError, StoreIncompleteError, StoreMismatchError
from lensray.profiles import SurveyProfile, recorded_profile

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
LABELS: dict[int, str] = {1: "lens", 0: "non-lens", -1: "unlabelled"}
SplitName = Literal["train", "val", "test"]
T = TypeVar("T")

FORMAT_VERSION = 1
# Provenance every store must carry; all of the caller's meta is part of the resume fingerprint.
REQUIRED_META: tuple[str, ...] = ("preprocess", "label_rule", "bands", "source")
# Set by the store itself; a caller passing one of these is an error, not an override.
STORE_META: tuple[str, ...] = ("lensray_version", "created", "finalized", "counts", "rejects", "shard_stats")
REJECT_FIELDS: tuple[str, ...] = ("id", "reason", "message")

# Noise-dominated float16 cutouts barely compress (~10 %); bit-shuffled LZ4 gets that much and
# decodes ~2x faster than zarr's default zstd.
_IMAGE_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
# Reading a shard's covering span and picking rows beats one request per sample once this fraction
# of the span is wanted (local disk: ~0.3 ms per sample inside a span vs ~1.4 ms per lone sample).
_DENSE_FRACTION = 0.25
_READ_THREADS = 8


# ----------------------------------------------------------------------------------------------
# Opening


# One async S3 filesystem per process and endpoint: zarr drives it from its own per-process event
# loop, and a fresh instance per call would open (and leak) a new HTTP session each time.
_ASYNC_S3: dict[tuple[Any, ...], Any] = {}


@atexit.register
def _close_async_s3() -> None:
    # Async instances get no finalizer from s3fs; close their connections or aiohttp warns at exit.
    for key, fs in _ASYNC_S3.items():
        client = getattr(fs, "_s3creator", None)
        if client is not None and key[0] == os.getpid():  # a forked child must not touch its parent's
            with contextlib.suppress(Exception):
                zarr_sync(client.__aexit__(None, None, None), timeout=2)
    _ASYNC_S3.clear()


# botocore's own retries for the store's client: standard mode's 2 attempts retry a dropped connection or a
# 503 within ~2 s; _RetryingStore then retries the request on storage's schedule (RETRY_DELAYS_S). Against a
# stopped endpoint a store call gives up after 16-22 s (storage's own calls: 19-20 s); botocore's default
# alone (legacy mode, 5 attempts, random backoff) gave up after anywhere from ~2 to 15 s.
_BOTOCORE_RETRIES = {"mode": "standard", "max_attempts": 2}


def _zarr_store(url: str, *, read_only: bool) -> Store:
    """A local path's LocalStore; for any other URL (s3://, gs://, memory://...) an fsspec store whose
    requests are retried (``_RetryingStore``)."""
    if storage.is_local(url):
        return LocalStore(storage.strip_scheme(url), read_only=read_only)
    if storage.is_s3(url):
        env = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")
        key = (os.getpid(), storage.s3_endpoint(), *(os.environ.get(name) for name in env))
        if key not in _ASYNC_S3:
            fs, _ = storage.filesystem(url)
            options = {**fs.storage_options, "asynchronous": True, "skip_instance_cache": True}
            _ASYNC_S3[key] = type(fs)(**options, config_kwargs={"retries": _BOTOCORE_RETRIES})
        fs = _ASYNC_S3[key]
    else:
        fs = _async_filesystem(storage.filesystem(url)[0])
    inner = FsspecStore(fs, path=storage.strip_scheme(url), read_only=read_only)
    return _RetryingStore(inner, url)


def _async_filesystem(fs: Any) -> Any:
    """An asynchronous instance of an fsspec filesystem, as zarr's FsspecStore needs: a new async instance
    of an async implementation (gcsfs, adlfs, http), or a sync one (memory) behind fsspec's wrapper."""
    if fs.async_impl:
        return type(fs)(**{**fs.storage_options, "asynchronous": True, "skip_instance_cache": True})
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs, asynchronous=True)


class _RetryingStore(WrapperStore[Store]):
    """A remote store whose every request is tried again on storage's schedule while the endpoint fails
    transiently (refused, reset, timed out, 5xx), then fails with StorageError naming the object's URL.

    A missing object keeps zarr's meaning (None, False, nothing listed); no raw botocore or aiohttp error
    reaches the caller. Each retried request is whole: a PUT is published complete or not at all.
    """

    def __init__(self, store: Store, url: str) -> None:
        super().__init__(store)
        self.url = url

    def _with_store(self, store: Store) -> _RetryingStore:
        return type(self)(store, self.url)

    def _retry(self, action: str, key: str, attempt: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return storage.retrying_async(action, storage.join(self.url, key) if key else self.url, attempt)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        return await self._retry("read", key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        key = key_ranges[0][0] if len(key_ranges) == 1 else ""
        return await self._retry("read", key, lambda: self._store.get_partial_values(prototype, key_ranges))

    async def exists(self, key: str) -> bool:
        return await self._retry("reach", key, lambda: self._store.exists(key))

    async def getsize(self, key: str) -> int:
        return await self._retry("reach", key, lambda: self._store.getsize(key))

    async def is_empty(self, prefix: str) -> bool:
        return await self._retry("list", prefix, lambda: self._store.is_empty(prefix))

    async def set(self, key: str, value: Buffer) -> None:
        await self._retry("write", key, lambda: self._store.set(key, value))

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        await self._retry("write", key, lambda: self._store.set_if_not_exists(key, value))

    async def delete(self, key: str) -> None:
        await self._retry("delete", key, lambda: self._store.delete(key))

    async def delete_dir(self, prefix: str) -> None:
        await self._retry("delete", prefix, lambda: self._store.delete_dir(prefix))

    async def clear(self) -> None:
        await self._retry("delete", "", self._store.clear)

    # Many-key requests through this store's own get/set (WrapperStore hands them to the inner store whole).
    def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        return Store._get_many(self, requests)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        await Store._set_many(self, values)

    # A listing is read whole, then handed out: a retry never repeats names already yielded.
    def list(self) -> AsyncIterator[str]:
        return self._listing("", self._store.list)

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._listing(prefix, lambda: self._store.list_prefix(prefix))

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self._listing(prefix, lambda: self._store.list_dir(prefix))

    async def _listing(self, prefix: str, names: Callable[[], AsyncIterator[str]]) -> AsyncIterator[str]:
        async def collect() -> list[str]:
            return [name async for name in names()]

        for name in await self._retry("list", prefix, collect):
            yield name


def _open_group(url: str, *, writable: bool) -> zarr.Group:
    try:
        return zarr.open_group(_zarr_store(url, read_only=not writable), mode="r+" if writable else "r", zarr_format=3)
    except (zarr.errors.NodeNotFoundError, FileNotFoundError):
        raise FileNotFoundError(f"no lensray store at {url}") from None


def _store_attrs(url: str, group: zarr.Group, states: Sequence[str]) -> dict[str, Any]:
    attrs = group.attrs.asdict()
    if "layout" not in attrs or "fingerprint" not in attrs:
        raise StoreError(f"{url} is a Zarr group but not a complete lensray store (creation interrupted?)")
    if attrs["layout"].get("format") != FORMAT_VERSION:
        raise StoreError(f"{url}: store format {attrs['layout'].get('format')}, this lensray reads {FORMAT_VERSION}")
    if attrs.get("state") not in states:
        raise StoreError(f"{url}: store is {attrs.get('state')!r}, this step needs one of {list(states)}")
    return attrs


def _has_objects(url: str) -> bool:
    fs, path = storage.arrow_filesystem(url)

    def attempt() -> bool:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
        return info.type != pafs.FileType.NotFound

    return storage.retrying("list", url, attempt)


# ----------------------------------------------------------------------------------------------
# Layout helpers


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of each shard's rows: fixed ``shard_size``, the last one may be shorter."""
    if n < 1 or shard_size < 1:
        raise ValueError(f"need n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def _report_url(url: str, shard_index: int) -> str:
    return storage.join(url, "shard_reports", f"shard-{shard_index:06d}.json")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _digest(values: np.ndarray, dtype: str) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(values, dtype=dtype).tobytes()).hexdigest()


def _jsonable(value: Any, where: str) -> Any:
    """A JSON-safe copy (pydantic models dumped, tuples as lists); the error names the offending key."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"{where}: key {key!r} is not a string")
            out[key] = _jsonable(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{k}]") for k, item in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise StoreError(f"{where}: {value} cannot be stored in JSON")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise StoreError(f"{where}: {type(value).__name__} {value!r} is not JSON-serialisable")


def _differences(stored: Any, requested: Any, path: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(stored) | set(requested)):
            sub = f"{path}.{key}" if path else key
            if key not in stored:
                out.append(f"{sub}: not in the store, requested {_short(requested[key])}")
            elif key not in requested:
                out.append(f"{sub}: store has {_short(stored[key])}, not in the request")
            else:
                out.extend(_differences(stored[key], requested[key], sub))
        return out
    return [] if stored == requested else [f"{path}: store has {_short(stored)}, requested {_short(requested)}"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _integer_column(values: npt.ArrayLike, name: str, n: int | None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or (n is not None and len(array) != n):
        raise StoreError(f"{name} must be 1-D of length {n if n is not None else 'N'}, got shape {array.shape}")
    if array.dtype.kind not in "iub":
        raise StoreError(f"{name} must hold integers, got dtype {array.dtype}")
    return array


def _check_columns(ids: npt.ArrayLike, labels: npt.ArrayLike, split: npt.ArrayLike) -> tuple[np.ndarray, ...]:
    ids = _integer_column(ids, "ids", None).astype(np.int64)
    if len(ids) == 0:
        raise StoreError("ids is empty: a store needs at least one object")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"ids must be unique; duplicated: {unique[counts > 1][:10].tolist()}")
    labels = _integer_column(labels, "labels", len(ids))
    split = _integer_column(split, "split", len(ids))
    for name, column, allowed in (("labels", labels, list(LABELS)), ("split", split, list(SPLITS.values()))):
        bad = np.flatnonzero(~np.isin(column, allowed))
        if bad.size:
            row = int(bad[0])
            raise StoreError(
                f"{name}[{row}] (ID {ids[row]}) = {column[row]}; allowed {sorted(allowed)} ({bad.size} bad rows)"
            )
    return ids, labels.astype(np.int8), split.astype(np.int8)


def _check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    meta = _jsonable(meta, "meta")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise StoreError(f"meta lacks {missing}: every store records {list(REQUIRED_META)}")
    reserved = [key for key in STORE_META if key in meta]
    if reserved:
        raise StoreError(f"meta keys {reserved} are set by the store itself; leave them out")
    return meta


# ----------------------------------------------------------------------------------------------
# Writing (driver: create_store, finalize_store; one task per shard: write_shard)


def create_store(
    url: str,
    *,
    ids: npt.ArrayLike,
    labels: npt.ArrayLike,
    split: npt.ArrayLike,
    channels: int,
    size: int | tuple[int, int],
    dtype: str | npt.DTypeLike = "float16",
    shard_size: int = 256,
    meta: Mapping[str, Any],
) -> None:
    """Create the store at ``url`` with every row's ID, label and split; or reopen it to resume.

    An existing store is reopened (its complete shards kept) only if its fingerprint -- the layout,
    ``meta`` (all of it: put run-specific facts in ``finalize_store``'s ``extra_meta``), the lensray
    version and digests of ``ids``, ``labels`` and ``split`` -- equals this call's; otherwise
    ``StoreMismatchError`` names every differing key. A resumed store is no longer finalized until
    ``finalize_store`` runs again.
    """
    ids, labels, split = _check_columns(ids, labels, split)
    layout = _layout(len(ids), channels, size, dtype, shard_size)
    base_meta = _check_meta(meta)
    fingerprint = {
        "layout": layout,
        "meta": base_meta,
        "lensray_version": __version__,
        "ids": _digest(ids, "<i8"),
        "labels": _digest(labels, "i1"),
        "split": _digest(split, "i1"),
    }
    storage.check_reachable(url, must_exist=False)
    zstore = _zarr_store(url, read_only=False)
    existing = _existing_attrs(url, zstore)
    if existing is not None and existing.get("state") != "creating":
        _reopen(url, zstore, existing, fingerprint)
    else:
        _create_arrays(zstore, fingerprint, {"ids": ids, "labels": labels, "split": split})


def _layout(n: int, channels: int, size: int | tuple[int, int], dtype: str | npt.DTypeLike, shard_size: int) -> dict:
    """The store's ``layout`` attribute, after checking the image shape and dtype."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    image_dtype = np.dtype(dtype)
    if image_dtype not in (np.float16, np.float32):
        raise StoreError(f"images dtype must be float16 or float32, got {image_dtype}")
    if min(channels, height, width, shard_size) < 1:
        raise StoreError(f"channels, size and shard_size must be >= 1, got {channels}, {(height, width)}, {shard_size}")
    return {
        "format": FORMAT_VERSION,
        "n": n,
        "channels": int(channels),
        "height": int(height),
        "width": int(width),
        "dtype": image_dtype.name,
        "shard_size": int(shard_size),
        "n_shards": len(shard_ranges(n, shard_size)),
    }


def _existing_attrs(url: str, zstore: Store) -> dict[str, Any] | None:
    """The root attributes of the Zarr group at ``url``; None where there is nothing at all."""
    try:
        return zarr.open_group(zstore, mode="r", zarr_format=3).attrs.asdict()
    except (zarr.errors.NodeNotFoundError, FileNotFoundError):
        if _has_objects(url):
            raise StoreError(f"{url} already holds data that is not a Zarr store; choose another URL") from None
        return None


def _reopen(url: str, zstore: Store, existing: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Resume a store created with the same fingerprint: keep its shards and creation time, mark it ready."""
    if "fingerprint" not in existing:
        raise StoreError(f"{url} is a Zarr group but not a lensray store; choose another URL")
    differences = _differences(existing["fingerprint"], fingerprint)
    if differences:
        raise StoreMismatchError(
            f"store {url} was created with different parameters: {'; '.join(differences)}. "
            "Resuming would mix two configurations: write to a new URL or delete the store."
        )
    created = existing.get("meta", {}).get("created", _now())
    group = zarr.open_group(zstore, mode="r+", zarr_format=3)
    arrays = ("images", "ids", "labels", "split", "valid", "shard_done")
    _remove_partials(url, ["zarr.json", *(f"{name}/zarr.json" for name in arrays)])
    group.attrs.put({**existing, "state": "ready", "meta": _base_meta(fingerprint["meta"], created)})


def _create_arrays(zstore: Store, fingerprint: dict[str, Any], columns: dict[str, np.ndarray]) -> None:
    """A new (or overwritten) store: the empty images, the columns written whole, no shard done."""
    layout = fingerprint["layout"]
    n, shard_size, n_shards = layout["n"], layout["shard_size"], layout["n_shards"]
    sample = (layout["channels"], layout["height"], layout["width"])
    # Marked "creating" first: a store interrupted here holds no shards and is safely recreated.
    group = zarr.open_group(zstore, mode="w", zarr_format=3, attributes={"state": "creating", "layout": layout})
    group.create_array(
        "images",
        shape=(n, *sample),
        dtype=np.dtype(layout["dtype"]),
        fill_value=np.nan,
        chunks=(1, *sample),
        shards=(shard_size, *sample),
        compressors=[_IMAGE_COMPRESSOR],
        dimension_names=("sample", "channel", "y", "x"),
    )
    column_chunks = {"chunks": (shard_size,), "shards": (n_shards * shard_size,)}
    for name, values in columns.items():
        group.create_array(name, data=values, **column_chunks, dimension_names=("sample",))
    group.create_array(
        "valid", shape=(n,), dtype=bool, fill_value=False, chunks=(shard_size,), dimension_names=("sample",)
    )
    group.create_array(
        "shard_done", shape=(n_shards,), dtype=np.int8, fill_value=0, chunks=(1,), dimension_names=("shard",)
    )
    meta_now = _base_meta(fingerprint["meta"], _now())
    group.attrs.put({"state": "ready", "layout": layout, "fingerprint": fingerprint, "meta": meta_now})


def _base_meta(base_meta: dict[str, Any], created: str) -> dict[str, Any]:
    return {**base_meta, "lensray_version": __version__, "created": created}


def write_shard(
    url: str,
    shard_index: int,
    images: npt.ArrayLike,
    valid: npt.ArrayLike,
    rejects: Sequence[Mapping[str, Any]],
    *,
    stats: Mapping[str, int | float] | None = None,
) -> None:
    """Write one whole shard: images of the valid rows, ``valid``, the shard's report, then its done mark.

    ``images`` is (rows, C, H, W) of any float dtype; it is cast to the store's dtype and every
    valid row must then be finite (an overflow to inf in float16 is an error, not a clip). Invalid
    rows are never written, so they read back as NaN. ``rejects`` holds one record per invalid row,
    ``{"id": int, "reason": str, "message": str (optional)}``, and nothing else. ``stats`` are
    counters (e.g. ``{"nan_pixels": 12}``) that ``finalize_store`` sums over all shards.

    StorageError, naming the store and the shard, when the store stays unreachable: the shard's done
    mark is then not set, so the ingest's rerun writes it.
    """
    try:
        _write_shard(url, shard_index, images, valid, rejects, stats)
    except StorageError as exc:
        raise StorageError(f"{url}: shard {shard_index} not written (a rerun writes it): {exc}") from exc


def _write_shard(
    url: str,
    shard_index: int,
    images: npt.ArrayLike,
    valid: npt.ArrayLike,
    rejects: Sequence[Mapping[str, Any]],
    stats: Mapping[str, int | float] | None,
) -> None:
    group = _open_group(url, writable=True)
    layout = _store_attrs(url, group, ("ready",))["layout"]
    if not 0 <= shard_index < layout["n_shards"]:
        raise StoreError(f"{url}: shard {shard_index} out of range: the store has shards 0..{layout['n_shards'] - 1}")
    start, stop = shard_ranges(layout["n"], layout["shard_size"])[shard_index]
    where = f"{url} shard {shard_index} (rows {start}:{stop})"
    ids = np.asarray(group["ids"][start:stop])
    valid = np.asarray(valid)
    if valid.shape != (stop - start,) or valid.dtype != bool:
        raise StoreError(f"{where}: valid must be bool of shape ({stop - start},), got {valid.dtype} {valid.shape}")
    block = _shard_images(images, valid, ids, layout, where)
    report = {
        "shard": shard_index,
        "start": start,
        "stop": stop,
        "n_valid": int(valid.sum()),
        "rejects": _shard_rejects(rejects, ids, valid, where),
        "stats": _shard_stats(stats, where),
    }

    done = group["shard_done"]
    if done[shard_index]:
        done[shard_index] = 0  # a rewrite is not complete until everything below is written again
    _remove_partials(url, [_chunk_key(group[name], shard_index) for name in ("images", "valid", "shard_done")])
    _remove_partials(url, [f"shard_reports/shard-{shard_index:06d}.json"])
    _delete_shard_images(group["images"], shard_index)
    group["images"][start:stop] = block
    group["valid"][start:stop] = valid
    storage.write_bytes(_report_url(url, shard_index), json.dumps(report, indent=1).encode())
    done[shard_index] = 1


def _chunk_key(array: zarr.Array, index: int) -> str:
    """The store key (``images/c/3/0/0/0``) of the object holding ``index`` along the first axis."""
    key = array.metadata.encode_chunk_key((index, *(0,) * (array.ndim - 1)))
    return f"{array.path}/{key}"


def _delete_shard_images(images: zarr.Array, shard_index: int) -> None:
    """Remove the shard's images object before it is written again.

    zarr merges a write into the existing shard object (it reads it first), and an object cut short by
    a killed task fails its checksum, so the rerun that should rewrite the shard would fail on it.
    """
    key = images.metadata.encode_chunk_key((shard_index, *(0,) * (images.ndim - 1)))
    zarr_sync((images.store_path / key).delete())


def _remove_partials(url: str, keys: Iterable[str]) -> list[str]:
    """Delete what killed writes of ``keys`` left in a local store: zarr's ``<key>.<hex>.partial`` and
    storage's ``.<name>.<hex>.partial`` temporary files, never renamed into place. Only the writer of
    ``keys`` calls this (a shard's task for its own objects, the driver for the metadata), so none of
    them is being written. Object storage publishes whole objects: nothing to clean there."""
    if not storage.is_local(url):
        return []
    root, removed = storage.strip_scheme(url), []
    for key in keys:
        folder, name = os.path.split(os.path.join(root, key))
        stem = name.split(".", 1)[0] if "." in name else name
        for pattern in (f"{stem}.*.partial", f".{name}.*.partial"):
            for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
    return removed


def _shard_images(images: npt.ArrayLike, valid: np.ndarray, ids: np.ndarray, layout: dict, where: str) -> np.ndarray:
    images = np.asarray(images)
    expected = (len(ids), layout["channels"], layout["height"], layout["width"])
    if images.shape != expected:
        raise StoreError(f"{where}: images must have shape {expected}, got {images.shape}")
    if images.dtype.kind != "f":
        raise StoreError(f"{where}: images must be floating point, got {images.dtype}")
    with np.errstate(over="ignore"):
        block = images.astype(layout["dtype"], copy=True)
    block[~valid] = np.nan
    bad = valid & ~np.isfinite(block).reshape(len(block), -1).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise StoreError(
            f"{where}: valid rows hold NaN/inf pixels (or values beyond {layout['dtype']} range) for IDs "
            f"{ids[rows][:10].tolist()}{' ...' if rows.size > 10 else ''}; mark them invalid with a reject reason"
        )
    return block


def _shard_rejects(rejects: Sequence[Mapping[str, Any]], ids: np.ndarray, valid: np.ndarray, where: str) -> list[dict]:
    records = []
    for k, record in enumerate(rejects):
        if not isinstance(record, Mapping) or "id" not in record or "reason" not in record:
            raise StoreError(f"{where}: rejects[{k}] must be a mapping with 'id' and 'reason', got {record!r}")
        extra = set(record) - set(REJECT_FIELDS)
        if extra:
            raise StoreError(f"{where}: rejects[{k}] has unknown fields {sorted(extra)}; allowed {list(REJECT_FIELDS)}")
        records.append(
            {"id": int(record["id"]), "reason": str(record["reason"]), "message": str(record.get("message", ""))}
        )
    rejected = [r["id"] for r in records]
    invalid = ids[~valid].tolist()
    if sorted(rejected) != sorted(invalid):
        unexplained = sorted(set(invalid) - set(rejected))
        foreign = sorted(set(rejected) - set(invalid))
        repeated = sorted(i for i, c in Counter(rejected).items() if c > 1)
        raise StoreError(
            f"{where}: rejects must name each invalid row's ID exactly once; invalid without a reason: "
            f"{unexplained[:10]}, rejected but not an invalid row of this shard: {foreign[:10]}, "
            f"repeated: {repeated[:10]}"
        )
    return sorted(records, key=lambda r: r["id"])


def _shard_stats(stats: Mapping[str, int | float] | None, where: str) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for key, value in (stats or {}).items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise StoreError(f"{where}: stats[{key!r}] must be a number, got {value!r}")
        if not math.isfinite(value):
            raise StoreError(f"{where}: stats[{key!r}] = {value} is not finite")
        out[str(key)] = value.item() if isinstance(value, np.generic) else value
    return out


def completed_shards(url: str) -> set[int]:
    """Indices of the shards whose every write finished (their done mark is set)."""
    group = _open_group(url, writable=False)
    _store_attrs(url, group, ("ready", "finalized"))
    return set(np.flatnonzero(np.asarray(group["shard_done"][:]) == 1).tolist())


def finalize_store(url: str, extra_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check every shard is complete, merge all shard reports into ``meta``; returns the final meta.

    Adds ``counts`` (valid objects per split and class, rejects per reason), ``rejects`` (every
    rejected row, from every shard, including shards written by an earlier run), ``shard_stats``
    (the shards' counters summed), ``finalized`` (time) and ``extra_meta``'s keys (which must not
    collide). Idempotent: a second call recomputes the same meta.
    """
    group = _open_group(url, writable=True)
    attrs = _store_attrs(url, group, ("ready", "finalized"))
    layout = attrs["layout"]
    missing = np.flatnonzero(np.asarray(group["shard_done"][:]) != 1)
    if missing.size:
        raise StoreIncompleteError(
            f"{url}: {missing.size} of {layout['n_shards']} shards are not complete "
            f"({missing[:20].tolist()}{' ...' if missing.size > 20 else ''}); rerun the ingest to write them"
        )
    reports = _read_reports(url, layout["n_shards"])
    ids, labels, split, valid = (np.asarray(group[name][:]) for name in ("ids", "labels", "split", "valid"))
    rejects = sorted((r for report in reports for r in report["rejects"]), key=lambda r: r["id"])
    if [r["id"] for r in rejects] != ids[~valid].tolist():
        raise StoreError(f"{url}: shard reports do not match the valid array; rewrite the store")
    shard_stats: dict[str, int | float] = {}
    for report in reports:
        for key, value in report["stats"].items():
            shard_stats[key] = shard_stats.get(key, 0) + value
    counts = _counts(labels, split, valid)
    counts["rejected_by_reason"] = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    fingerprint = attrs["fingerprint"]
    meta = {
        **fingerprint["meta"],
        "lensray_version": fingerprint["lensray_version"],
        "created": attrs["meta"].get("created", _now()),
        "finalized": _now(),
        "counts": counts,
        "rejects": rejects,
        "shard_stats": shard_stats,
    }
    extra = _jsonable(extra_meta or {}, "extra_meta")
    clashes = sorted(set(extra) & set(meta))
    if clashes:
        raise StoreError(f"extra_meta keys {clashes} would overwrite the store's own meta")
    meta.update(extra)
    group.attrs.put({**attrs, "state": "finalized", "meta": meta})
    return meta


def _read_reports(url: str, n_shards: int) -> list[dict[str, Any]]:
    def read(shard_index: int) -> dict[str, Any]:
        report_url = _report_url(url, shard_index)
        try:
            return json.loads(storage.read_bytes(report_url))
        except (OSError, ValueError) as exc:
            message = f"{url}: shard {shard_index} is done but its report {report_url} is unreadable: {exc}"
            raise StoreError(message) from exc

    # Many small objects: fetch them concurrently (S3 latency, not bandwidth, is the cost).
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(read, range(n_shards)))


def _counts(labels: np.ndarray, split: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    counts: dict[str, Any] = {"n": len(valid), "valid": int(valid.sum()), "rejected": int((~valid).sum())}
    for name, code in SPLITS.items():
        in_split = valid & (split == code)
        counts[name] = {label_name: int((in_split & (labels == label)).sum()) for label, label_name in LABELS.items()}
    return counts


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Span:
    """One read request: rows ``start:stop`` of one shard; ``take`` picks rows from it (None: all)."""

    start: int
    stop: int
    out: int  # first row of the output that it fills
    take: np.ndarray | None


def _plan_spans(rows: np.ndarray, shard_size: int) -> list[_Span]:
    """Cover sorted unique ``rows`` with slice reads, none crossing a shard boundary."""
    spans: list[_Span] = []
    out = 0
    shard_of = rows // shard_size
    for group in np.split(rows, np.flatnonzero(np.diff(shard_of)) + 1):
        first, last = int(group[0]), int(group[-1])
        width = last - first + 1
        if len(group) == width or len(group) >= _DENSE_FRACTION * width:
            spans.append(_Span(first, last + 1, out, None if len(group) == width else group - first))
            out += len(group)
            continue
        for run in np.split(group, np.flatnonzero(np.diff(group) != 1) + 1):
            spans.append(_Span(int(run[0]), int(run[-1]) + 1, out, None))
            out += len(run)
    return spans


class LensStore:
    """Read side of a store, opened by URL. Picklable: array handles are reopened in each process.

    Columns (``ids``, ``labels``, ``split``, ``valid``) are read once, on first use, one object each.
    Images are read only when asked: ``read(indices)`` in batches, ``load_split`` into RAM.
    """

    def __init__(self, url: str, attrs: dict[str, Any]) -> None:
        self.url = url
        self._attrs = attrs
        self._columns: dict[str, np.ndarray] = {}
        self._images: zarr.Array | None = None

    @classmethod
    def open(cls, url: str) -> LensStore:
        """Open the store at ``url`` (one request: the root attributes)."""
        group = _open_group(url, writable=False)
        return cls(url, _store_attrs(url, group, ("ready", "finalized")))

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "_attrs": self._attrs, "_columns": self._columns, "_images": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LensStore({self.url!r}, n={self.n}, state={self.state!r})"

    # -- metadata ------------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        return self._attrs["meta"]

    @property
    def layout(self) -> dict[str, Any]:
        return self._attrs["layout"]

    @property
    def state(self) -> str:
        return self._attrs["state"]

    @property
    def finalized(self) -> bool:
        return self.state == "finalized"

    @property
    def n(self) -> int:
        return self.layout["n"]

    @property
    def profile(self) -> SurveyProfile:
        """The survey profile the store was ingested from (a store that recorded none: ``euclid_challenge``)."""
        return recorded_profile(self.meta.get("profile"))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.layout["channels"], self.layout["height"], self.layout["width"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.layout["dtype"])

    # -- columns -------------------------------------------------------------------------------

    def _column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            values = np.asarray(_open_group(self.url, writable=False)[name][:])
            values.setflags(write=False)  # cached and shared: callers must not edit it in place
            self._columns[name] = values
        return self._columns[name]

    @property
    def ids(self) -> np.ndarray:
        return self._column("ids")

    @property
    def labels(self) -> np.ndarray:
        return self._column("labels")

    @property
    def split(self) -> np.ndarray:
        return self._column("split")

    @property
    def valid(self) -> np.ndarray:
        """False where the object was rejected. After finalization derived from ``meta`` (no reads)."""
        if "valid" not in self._columns:
            if self.finalized:
                values = ~np.isin(self.ids, [r["id"] for r in self.meta["rejects"]])
                values.setflags(write=False)
                self._columns["valid"] = values
            else:
                return self._column("valid")
        return self._columns["valid"]

    def _require_finalized(self) -> None:
        if not self.finalized:
            raise StoreIncompleteError(
                f"{self.url} is not finalized (an ingest is running or was interrupted); "
                "rerun the ingest so that every shard is written"
            )

    def indices(self, split: SplitName | None = None, label: int | None = None) -> np.ndarray:
        """Sorted row indices of the valid objects, optionally of one split and/or one label."""
        self._require_finalized()
        mask = self.valid.copy()
        if split is not None:
            if split not in SPLITS:
                raise StoreError(f"unknown split {split!r}; one of {list(SPLITS)}")
            mask &= self.split == SPLITS[split]
        if label is not None:
            if label not in LABELS:
                raise StoreError(f"unknown label {label!r}; one of {list(LABELS)}")
            mask &= self.labels == label
        return np.flatnonzero(mask).astype(np.int64)

    # -- images --------------------------------------------------------------------------------

    def _image_array(self) -> zarr.Array:
        if self._images is None:
            self._images = _open_group(self.url, writable=False)["images"]
        return self._images

    def read(self, indices: npt.ArrayLike, *, allow_invalid: bool = False) -> np.ndarray:
        """Images of rows ``indices`` (any order, repeats allowed) as (len, C, H, W) in the store's dtype.

        Rows are sorted and read as slices, a shard's covering span when a good part of it is
        wanted, several requests at once. Rejected rows are an error unless ``allow_invalid``
        (then they read as NaN).
        """
        self._require_finalized()
        rows = np.asarray(indices)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise StoreError(f"{self.url}: indices must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            bad = rows[(rows < 0) | (rows >= self.n)]
            raise StoreError(f"{self.url}: indices {bad[:10].tolist()} outside 0..{self.n - 1}")
        unique, inverse = np.unique(rows, return_inverse=True)
        if not allow_invalid and not self.valid[unique].all():
            rejected = self.ids[unique[~self.valid[unique]]]
            raise StoreError(f"{self.url}: rows of rejected IDs {rejected[:10].tolist()} requested; they hold no image")
        out = np.empty((len(unique), *self.sample_shape), dtype=self.dtype)
        spans = _plan_spans(unique, self.layout["shard_size"]) if unique.size else []
        images = self._image_array()

        def fetch(span: _Span) -> None:
            if span.take is None:  # straight into the output: no extra copy
                target = out[span.out : span.out + span.stop - span.start]
                images.get_basic_selection(slice(span.start, span.stop), out=NDBuffer.from_numpy_array(target))
            else:
                block = images.get_basic_selection(slice(span.start, span.stop))
                out[span.out : span.out + len(span.take)] = block[span.take]

        if len(spans) <= 1:
            for span in spans:
                fetch(span)
        else:
            with ThreadPoolExecutor(min(len(spans), _READ_THREADS)) as pool:
                list(pool.map(fetch, spans))
        return out if np.array_equal(rows, unique) else out[inverse]

    def load_split(self, split: SplitName) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(images, labels, ids)`` of a split's valid objects, all in RAM (images: N x C x H x W)."""
        rows = self.indices(split)
        return self.read(rows), self.labels[rows], self.ids[rows]

    # -- summary -------------------------------------------------------------------------------

    def info(self) -> str:
        """A human summary: layout, state, counts per split and class, provenance, rejects."""
        meta, layout = self.meta, self.layout
        c, h, w = self.sample_shape
        lines = [
            f"lensray store {self.url}",
            f"  layout   {layout['n']} objects x {c} x {h} x {w} {layout['dtype']}, "
            f"{layout['n_shards']} shards of {layout['shard_size']}",
            f"  created  {meta.get('created')} with lensray {meta.get('lensray_version')}",
        ]
        if not self.finalized:
            done = len(completed_shards(self.url))
            lines.append(f"  state    NOT FINALIZED: {done} of {layout['n_shards']} shards complete")
        else:
            counts = meta["counts"]
            valid, rejected = counts["valid"], counts["rejected"]
            lines.append(f"  state    finalized {meta['finalized']}: {valid} valid, {rejected} rejected")
            lines.append(f"  {'split':8s} {'lens':>8s} {'non-lens':>9s} {'unlabelled':>11s} {'total':>8s}")
            rows = {name: counts[name] for name in SPLITS}
            rows["all"] = {label: sum(row[label] for row in rows.values()) for label in LABELS.values()}
            for name, row in rows.items():
                cells = f"{row['lens']:8d} {row['non-lens']:9d} {row['unlabelled']:11d} {sum(row.values()):8d}"
                lines.append(f"  {name:8s} {cells}")
        skip = {"created", "lensray_version", "finalized", "counts", "rejects", "profile"}
        survey = self.profile
        scales = ", ".join(f'{b.name} {b.pixel_scale:g}"/px' for b in survey.bands)
        lines.append(f"  {'profile':10s} {survey.name}: {scales}; reference {survey.reference}")
        for key, value in meta.items():
            if key == "transform" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "profile"}  # printed whole just above
            if key not in skip:
                lines.append(f"  {key:10s} {_describe(value)}")
        if self.finalized and meta["rejects"]:
            by_reason = meta["counts"]["rejected_by_reason"]
            lines.append("  rejects  " + ", ".join(f"{reason}: {count}" for reason, count in by_reason.items()))
            for record in meta["rejects"][:10]:
                detail = f" ({record['message']})" if record["message"] else ""
                lines.append(f"    {record['id']}: {record['reason']}{detail}")
            if len(meta["rejects"]) > 10:
                lines.append(f"    ... {len(meta['rejects']) - 10} more in meta['rejects']")
        return "\n".join(lines)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_describe(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, list):
        return ",".join(_describe(v) for v in value)
    return str(value)
