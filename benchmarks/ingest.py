"""Ingest throughput: the Ray Data pipeline vs a plain single-process loop, measured in one run.

Both paths do the same work with the same library code (read a shard's FITS, preprocess it as a batch,
write the whole Zarr shard); the baseline runs it in this process, one shard after another, the
pipeline as Ray tasks. Targets (issue 4): Ray >= 1.6x the single-process rate on 2 cores for local
files, S3 (moto on loopback) within 0.5x of local. Also: input bytes/s, and the driver's peak memory
for a small and a 5,000-ID run, which must not grow with N (the driver holds IDs, never images).

    python benchmarks/ingest.py [--n 400] [--big 5000] [--workers 2]
"""

from __future__ import annotations

import os

# A fair 1-core baseline: Ray workers get one BLAS/OpenMP thread each, so does this process.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lensray import storage
from lensray.config import DataConfig, PreprocessConfig, SimulateConfig
from lensray.ingest.ingest import assign_splits, ingest
from lensray.ingest.preprocess import output_shape, preprocess_batch
from lensray.ingest.store import create_store, finalize_store, shard_ranges, write_shard
from lensray.sky.bands import BAND_NAMES, band_relpath
from lensray.sky.catalog import CATALOG_NAME, apply_label_rule, read_catalog
from lensray.sky.fits import read_cutouts

SHARD_SIZE = 50


def configs(images: str, out: str, workers: int) -> tuple[DataConfig, PreprocessConfig]:
    data = DataConfig(images=images, catalog=storage.join(images, CATALOG_NAME))
    return data, PreprocessConfig(out=out, shard_size=SHARD_SIZE, workers=workers)


def single_process(data: DataConfig, preprocess: PreprocessConfig) -> float:
    """The same read -> preprocess -> whole-shard write, one shard after another, no Ray."""
    start = time.perf_counter()
    labelled = apply_label_rule(read_catalog(data.catalog), data.labels)
    ids = labelled.ids
    split = assign_splits(ids, preprocess.val_fraction, preprocess.test_fraction, preprocess.split_seed)
    meta = {
        "preprocess": preprocess.model_dump(mode="json", exclude={"out", "workers", "strict"}),
        "label_rule": data.labels,
        "bands": list(data.bands),
        "source": {"images": data.images},
    }
    size = output_shape(preprocess)[0]
    create_store(
        preprocess.out,
        ids=ids,
        labels=labelled.labels,
        split=split,
        channels=len(data.bands),
        size=size,
        dtype=preprocess.dtype,
        shard_size=preprocess.shard_size,
        meta=meta,
    )
    for index, (lo, hi) in enumerate(shard_ranges(len(ids), preprocess.shard_size)):
        shard_ids = [int(i) for i in ids[lo:hi]]
        cutouts, rejects = read_cutouts(data.images, shard_ids, data.bands, data.nan)
        good = {c.object_id: c for c in cutouts}
        images = np.full((len(shard_ids), len(data.bands), size, size), np.nan, dtype=preprocess.dtype)
        rows = [k for k, i in enumerate(shard_ids) if i in good]
        images[rows] = preprocess_batch([good[shard_ids[k]].bands for k in rows], preprocess, data.bands)
        valid = np.isin(shard_ids, list(good))
        write_shard(
            preprocess.out,
            index,
            images,
            valid,
            [{"id": int(r.object_id), "reason": r.reason, "message": str(r)} for r in rejects],
        )
    finalize_store(preprocess.out)
    return time.perf_counter() - start


def ray_pipeline(data: DataConfig, preprocess: PreprocessConfig) -> float:
    start = time.perf_counter()
    ingest(data, preprocess, progress=False)
    return time.perf_counter() - start


def raw_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.fits"))


def upload(root: Path, url: str) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(url, str(path.relative_to(root))), path.read_bytes())


def replicate(root: Path, target: Path, n: int) -> None:
    """An n-ID set made of hard links to a small simulated one: same bytes per ID, no simulation cost."""
    text = (root / CATALOG_NAME).read_text().splitlines()
    header_at = next(k for k, line in enumerate(text) if ",ID," in line or line.startswith(",ID"))
    rows = text[header_at + 1 :]
    source_ids = [int(r.split(",")[1]) for r in rows]
    lines = text[: header_at + 1]
    for k in range(n):
        source = source_ids[k % len(source_ids)]
        new_id = 300001 + k
        fields = rows[k % len(rows)].split(",")
        fields[0], fields[1] = str(k), str(new_id)
        lines.append(",".join(fields))
        for band in BAND_NAMES:
            src = root / band_relpath(band, source)
            if src.exists():
                dst = target / band_relpath(band, new_id)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)
    (target / CATALOG_NAME).write_text("\n".join(lines) + "\n")


def driver_peak_mb(images: str, out: str, workers: int) -> float:
    """Peak RSS of a fresh driver process running the whole ingest."""
    code = (
        "import resource, sys, ray;"
        "from lensray.config import DataConfig, PreprocessConfig;"
        "from lensray.ingest.ingest import ingest;"
        f"ray.init(num_cpus={workers}, log_to_driver=False);"
        f"ingest(DataConfig(images={images!r}, catalog={images!r} + '/{CATALOG_NAME}'),"
        f" PreprocessConfig(out={out!r}, shard_size={SHARD_SIZE}, workers={workers}), progress=False);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process: in this one it would share the GIL with the baseline loop."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return server, "s3://bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="IDs for the throughput runs")
    parser.add_argument("--big", type=int, default=5000, help="IDs for the driver-memory run")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import ray

    server, bucket = start_moto()  # before ray.init, so workers inherit the endpoint
    ray.init(num_cpus=args.workers, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        raw = tmp_path / "raw"
        t0 = time.perf_counter()
        simulate_config = SimulateConfig(out=str(raw), n=args.n, seed=1, missing_image_rate=0.0, duplicate_id_rate=0.0)
        from lensray.simulate.writer import simulate_dataset

        simulate_dataset(simulate_config)
        print(f"simulated {args.n} IDs in {time.perf_counter() - t0:.0f} s; {raw_bytes(raw) / 1e6:.1f} MB of FITS")
        upload(raw, storage.join(bucket, "raw"))
        nbytes = raw_bytes(raw)

        # Warm-up: worker start-up and imports are a fixed cost, not throughput.
        ray_pipeline(*configs(str(raw), str(tmp_path / "warm.zarr"), args.workers))

        results = {}
        for where, images, out in (
            ("local", str(raw), str(tmp_path / "{}.zarr")),
            ("s3", storage.join(bucket, "raw"), storage.join(bucket, "stores", "{}.zarr")),
        ):
            base = single_process(*configs(images, out.format("single"), 1))
            fast = ray_pipeline(*configs(images, out.format("ray"), args.workers))
            results[where] = {
                "single_rows_s": args.n / base,
                "ray_rows_s": args.n / fast,
                "ray_bytes_s": nbytes / fast,
                "speedup": base / fast,
            }

        print(f"\ningest of {args.n} IDs (4 x 200 x 200, asinh, float16), {args.workers} Ray workers")
        print(f"{'':6s} {'single rows/s':>14s} {'ray rows/s':>11s} {'ray MB/s':>9s} {'ray/single':>11s}")
        for where, r in results.items():
            print(
                f"{where:6s} {r['single_rows_s']:14.1f} {r['ray_rows_s']:11.1f} {r['ray_bytes_s'] / 1e6:9.2f} {r['speedup']:10.2f}x"
            )
        s3_vs_local = results["s3"]["ray_rows_s"] / results["local"]["ray_rows_s"]
        print(f"ray speed-up on local files: {results['local']['speedup']:.2f}x (target >= 1.6x)")
        print(f"ray S3 / ray local: {s3_vs_local:.2f}x (target >= 0.5x)")
        ray.shutdown()

        small, big = tmp_path / "small", tmp_path / "big"
        replicate(raw, small, min(500, args.big))
        replicate(raw, big, args.big)
        peak_small = driver_peak_mb(str(small), str(tmp_path / "mem_small.zarr"), args.workers)
        peak_big = driver_peak_mb(str(big), str(tmp_path / "mem_big.zarr"), args.workers)
        print(
            f"driver peak RSS: {peak_small:.0f} MB at {min(500, args.big)} IDs, {peak_big:.0f} MB at {args.big} IDs "
            f"(ratio {peak_big / peak_small:.2f}; flat means it does not grow with N)"
        )
        print(json.dumps({"results": results, "s3_vs_local": s3_vs_local, "driver_peak_mb": [peak_small, peak_big]}))
    server.terminate()


if __name__ == "__main__":
    main()
