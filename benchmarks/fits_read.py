"""FITS cutout read rate: local disk vs S3 (moto on loopback) through pyarrow vs through s3fs.

All three paths read the same objects written with astropy and decode them with the same
``lensray.sky.fits.decode_band``; only the byte transport differs. Ratios are measured in this one
run, so they hold on any machine; the absolute rates depend on it. Loopback moto has almost no
latency, so against a real object store the gap between sequential and concurrent reads grows.

    python benchmarks/fits_read.py [--n 200] [--repeats 3] [--threads 8]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
from astropy.io import fits

from lensray import storage
from lensray.sky.bands import BAND_NAMES, BANDS, band_relpath
from lensray.sky.fits import Cutout, decode_band, read_cutouts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_dataset(roots: list[str], ids: list[int]) -> None:
    rng = np.random.default_rng(0)
    for object_id in ids:
        for band in BAND_NAMES:
            size = BANDS[band].size
            buffer = io.BytesIO()
            fits.PrimaryHDU(rng.normal(1e-11, 3e-12, (size, size)).astype(np.float32)).writeto(buffer)
            for root in roots:
                storage.write_bytes(storage.join(root, band_relpath(band, object_id)), buffer.getvalue())


def read_with_s3fs(root: str, ids: list[int], batched: bool) -> list[Cutout]:
    """The same decode as fits_io, with bytes fetched through s3fs (one at a time, or one async batch)."""
    fs, base = storage.filesystem(root)
    paths = {(i, b): f"{base}/{band_relpath(b, i)}" for i in ids for b in BAND_NAMES}
    if batched:
        blobs = fs.cat(list(paths.values()), on_error="raise")
        data = {key: blobs[path] for key, path in paths.items()}
    else:
        data = {key: fs.cat_file(path) for key, path in paths.items()}
    cutouts = []
    for object_id in ids:
        bands, nans = {}, {}
        for band in BAND_NAMES:
            url = f"s3://{paths[object_id, band]}"
            bands[band], nans[band] = decode_band(data[object_id, band], object_id, band, url, "zero")
        cutouts.append(Cutout(object_id, bands, nans))
    return cutouts


def measure(paths: dict[str, Callable[[list[int]], list[Cutout]]], ids: list[int], repeats: int) -> dict[str, float]:
    """Median cutouts/s per path. Runs are interleaved across paths so that load from other processes
    on a shared machine falls on every path alike; one short warm-up per path first."""
    for read in paths.values():
        read(ids[:10])
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, read in paths.items():
            started = time.perf_counter()
            cutouts = read(ids)
            rates[name].append(len(ids) / (time.perf_counter() - started))
            if len(cutouts) != len(ids):
                raise RuntimeError(f"{name}: read {len(cutouts)} cutouts, expected {len(ids)}")
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of IDs (4 FITS files each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8, help="threads for the concurrent pyarrow row")
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1"
    )
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory(prefix="lensray-bench-") as tmp:
            local_root, s3_root = os.path.join(tmp, "Public"), "s3://bench/Public"
            ids = list(range(200001, 200001 + args.n))
            write_dataset([local_root, s3_root], ids)

            paths: dict[str, Callable[[list[int]], list[Cutout]]] = {
                "local disk, sequential": lambda i: read_cutouts(local_root, i, BAND_NAMES, threads=1)[0],
                "S3 pyarrow, sequential": lambda i: read_cutouts(s3_root, i, BAND_NAMES, threads=1)[0],
                "S3 s3fs, sequential": lambda i: read_with_s3fs(s3_root, i, batched=False),
                f"S3 pyarrow, {args.threads} threads": (
                    lambda i: read_cutouts(s3_root, i, BAND_NAMES, threads=args.threads)[0]
                ),
                "S3 s3fs, one async batch": lambda i: read_with_s3fs(s3_root, i, batched=True),
            }
            by_name = measure(paths, ids, args.repeats)
    finally:
        server.stop()

    local = by_name["local disk, sequential"]
    print(
        f"FITS read rate, {args.n} IDs x {len(BAND_NAMES)} bands, median of {args.repeats} runs, {os.cpu_count()} CPUs"
    )
    print(f"{'path':32s} {'cutouts/s':>10s} {'vs local':>9s}")
    for name, value in by_name.items():
        print(f"{name:32s} {value:10.1f} {value / local:8.2f}x")
    seq = by_name["S3 pyarrow, sequential"] / by_name["S3 s3fs, sequential"]
    par = by_name[f"S3 pyarrow, {args.threads} threads"] / by_name["S3 s3fs, one async batch"]
    print(f"pyarrow / s3fs: sequential {seq:.2f}x, concurrent {par:.2f}x")


if __name__ == "__main__":
    main()
