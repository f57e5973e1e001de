"""`lensray score` throughput and driver memory against a plain one-process loop, at two catalogue sizes.

The baseline is the project's own read -> preprocess -> forward functions (``sky.fits.read_cutouts``,
``ingest.preprocess.preprocess_cutouts``, ``runs.Run.predict``) in one loop in this process, one torch thread,
64 IDs at a time; its rate excludes imports and the model load. The command is the whole ``lensray score``
in a fresh process with its own local Ray cluster (imports, cluster start, actors, ranking, outputs). Its
steady state is measured from the timings every part file records (``started``/``finished`` in its Parquet
metadata): the IDs done between the first finished part and the last started one, when every actor is busy;
the actors' CPU seconds per ID (``cpu_s``) against the loop's say how much work the pipeline adds, whatever
the machine's load (other processes skew the wall-clock ratios).
Target (issue 15): steady state >= 0.9 x cores times the plain loop. Cutouts: 4 x 200 x 200 simulated FITS,
hard-linked under new IDs (same bytes per ID), binned 4 -> 4 x 50 x 50, the full LASTRO network (1 epoch).

    python benchmarks/score.py [--n 1000 10000] [--sim 64]
"""

from __future__ import annotations

import os

# A fair 1-core baseline: the scoring actors get one torch/BLAS thread each, so does this process.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from lensray.config import DataConfig, PreprocessConfig, SimulateConfig, load_config
from lensray.evaluate.parts import PART_METADATA
from lensray.ingest.ingest import ingest
from lensray.ingest.preprocess import preprocess_cutouts
from lensray.runs import load_run, model_input
from lensray.sky.bands import BAND_NAMES, band_relpath
from lensray.sky.catalog import CATALOG_NAME, read_catalog
from lensray.sky.fits import read_cutouts

LASTRO = Path(__file__).resolve().parents[1] / "configs" / "lastro.yaml"
BATCH = 64


def train_checkpoint(folder: Path, n_sim: int) -> tuple[str, str]:
    """``(raw root, checkpoint)``: a small simulated set, its store (4 x 50 x 50) and a 1-epoch LASTRO run."""
    import ray

    from lensray.simulate.writer import simulate_dataset
    from lensray.train.trainer import train

    raw = folder / "raw"
    simulate_dataset(SimulateConfig(out=str(raw), n=n_sim, seed=1, missing_image_rate=0.0, duplicate_id_rate=0.0))
    store = str(folder / "store.zarr")
    data = DataConfig(images=str(raw), catalog=str(raw / CATALOG_NAME))
    ingest(data, PreprocessConfig(out=store, bin=4, val_fraction=0.25, test_fraction=0.0), progress=False)
    overrides = [f"data.store={store}", f"train.out={folder / 'runs'}", "train.name=bench", "train.epochs=1"]
    overrides += ["train.steps_per_epoch=2", "train.batch_size=8", "train.sanity=false"]
    checkpoint = train(load_config(LASTRO, overrides)).best_checkpoint
    ray.shutdown()
    return str(raw), checkpoint


def replicate(raw: Path, target: Path, n: int) -> str:
    """``n`` IDs hard-linked to the simulated ones (every band); returns the ID-list catalogue's path."""
    sources = read_catalog(str(raw / CATALOG_NAME)).ids.tolist()
    ids = [500001 + k for k in range(n)]
    for new_id, source in zip(ids, sources * (n // len(sources) + 1), strict=False):
        for band in BAND_NAMES:
            destination = target / band_relpath(band, new_id)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.link(raw / band_relpath(band, source), destination)
    listing = target / "ids.csv"
    listing.write_text("ID\n" + "\n".join(map(str, ids)) + "\n")
    return str(listing)


def plain_loop(checkpoint: str, images: str, listing: str) -> tuple[float, float]:
    """``(IDs/s, CPU s per ID)`` of the project's read -> preprocess -> forward in one loop, one thread
    (model load excluded)."""
    torch.set_num_threads(1)
    run, contract = load_run(checkpoint), model_input(checkpoint)
    ids = [int(i) for i in np.loadtxt(listing, skiprows=1, dtype=np.int64, ndmin=1)]
    started, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(ids), BATCH):
        cutouts, _ = read_cutouts(images, ids[first : first + BATCH], contract.bands, run.config.data.nan)
        prepared = preprocess_cutouts(cutouts, contract.preprocess, contract.bands)
        run.predict(prepared.images[prepared.accepted])
    return len(ids) / (time.perf_counter() - started), (time.process_time() - cpu) / len(ids)


def whole_command(checkpoint: str, images: str, listing: str, out: str) -> tuple[float, float]:
    """``(wall seconds, driver peak RSS in MB)`` of ``lensray score`` in a fresh process and Ray cluster."""
    argv = ["score", "--run", checkpoint, "--images", images, "--catalog", listing, "--out", out, "--device", "cpu"]
    code = (
        "import resource, sys; from lensray.cli import main; "
        f"code = main({argv!r}); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(code)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"lensray score failed:\n{result.stderr[-3000:]}")
    peak = next(float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK"))
    return wall, peak


def steady_rate(parts: Path) -> tuple[float, float, int]:
    """``(IDs/s, actor CPU s per ID, parts)``: the rate between the first finished part and the last started
    one (every actor busy); the CPU time that the actors spent per ID, over every part."""
    spans, cpu = [], 0.0
    for path in sorted(parts.glob("part-*.parquet")):
        meta = json.loads(pq.read_schema(path).metadata[PART_METADATA])
        spans.append((meta["started"], meta["finished"], pq.read_metadata(path).num_rows))
        cpu += meta["cpu_s"]
    lo, hi = min(s[1] for s in spans), max(s[0] for s in spans)
    if hi <= lo:  # too few parts for a window with every actor busy: the whole span
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    done = sum(n * max(0.0, min(f, hi) - max(s, lo)) / max(f - s, 1e-9) for s, f, n in spans)
    return done / (hi - lo), cpu / sum(s[2] for s in spans), len(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs=2, default=[1000, 10000], help="the two catalogue sizes")
    parser.add_argument("--sim", type=int, default=64, help="simulated cutouts, hard-linked up to each N")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw, checkpoint = train_checkpoint(folder, args.sim)
        for n in args.n:
            target = folder / f"n{n}"
            listing = replicate(Path(raw), target, n)
            load = os.getloadavg()[0]
            baseline, plain_cpu = plain_loop(checkpoint, str(target), listing)
            wall, peak = whole_command(checkpoint, str(target), listing, str(folder / f"c{n}.parquet"))
            steady, actor_cpu, n_parts = steady_rate(folder / f"c{n}_parts")
            results.append(
                {
                    "n": n,
                    "plain_ids_s": baseline,
                    "command_ids_s": n / wall,
                    "steady_ids_s": steady,
                    "command_ratio": n / wall / baseline,
                    "steady_ratio": steady / baseline,
                    "driver_peak_mb": peak,
                    "parts": n_parts,
                    # CPU s per ID, plain / actor: load-independent, x cores = the steady ratio on an idle machine
                    "cpu_efficiency": plain_cpu / actor_cpu,
                    "load_avg": [load, os.getloadavg()[0]],
                }
            )
    print(f"\nlensray score vs a plain one-process loop, 4 x 50 x 50 LASTRO, {cores} cores")
    header = f"{'N':>7s} {'plain/s':>8s} {'command/s':>10s} {'ratio':>6s} {'steady/s':>9s} {'ratio':>6s}"
    print(f"{header} {'CPU eff.':>9s} {'driver MB':>10s} {'load':>10s}")
    for r in results:
        print(
            f"{r['n']:7d} {r['plain_ids_s']:8.1f} {r['command_ids_s']:10.1f} {r['command_ratio']:5.2f}x "
            f"{r['steady_ids_s']:9.1f} {r['steady_ratio']:5.2f}x {r['cpu_efficiency']:8.2f}x "
            f"{r['driver_peak_mb']:10.0f} {r['load_avg'][0]:4.1f}-{r['load_avg'][1]:4.1f}"
        )
    print(f"target: steady state >= {0.9 * cores:.1f}x (0.9 x {cores} cores)")
    print("CPU eff.: the plain loop's CPU seconds per ID over the actors' (x cores = the steady ratio on an idle")
    print("machine); load: the 1-min load average before and after, a busy machine skews the wall-clock ratios")
    small, big = results
    print(f"driver peak RSS x{big['driver_peak_mb'] / small['driver_peak_mb']:.2f} for N x{big['n'] / small['n']:.0f}")
    print(json.dumps({"cores": cores, "results": results}))


if __name__ == "__main__":
    main()
