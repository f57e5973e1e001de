"""Simulation rate: one Ray worker vs all cores, measured in this one run.

Both runs use the same code path (Ray tasks over chunks of IDs, FITS files to a temp dir) after a
warm-up that starts the workers and imports lenstronomy in them, so the ratio measures parallel
scaling alone. Target: ratio >= 0.8 x cores. The absolute rate depends on the machine (and on what
else runs on it), the ratio much less.

    python benchmarks/simulate.py [--n-per-core 32] [--cores N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray

from lensray.config import SimulateConfig
from lensray.simulate.writer import simulate_dataset


def rate(out: str, n: int, workers: int, seed: int) -> float:
    start = time.perf_counter()
    simulate_dataset(SimulateConfig(out=out, n=n, seed=seed, workers=workers))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-core", type=int, default=32, help="objects per worker in each timed run")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    ray.init(num_cpus=args.cores, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rate(f"{tmp}/warmup", 2 * args.cores, args.cores, seed=99)  # start workers, import lenstronomy
            one = rate(f"{tmp}/one", args.n_per_core, 1, seed=1)
            many = rate(f"{tmp}/many", args.n_per_core * args.cores, args.cores, seed=2)
    finally:
        ray.shutdown()
    ratio = many / one
    target = 0.8 * args.cores
    print(f"simulate: 1 worker {one:.1f} objects/s ({args.n_per_core} objects)")
    print(f"simulate: {args.cores} workers {many:.1f} objects/s ({args.n_per_core * args.cores} objects)")
    verdict = "OK" if ratio >= target else "BELOW TARGET"
    print(f"ratio {ratio:.2f} (target >= {target:.1f} = 0.8 x {args.cores} cores): {verdict}")


if __name__ == "__main__":
    main()
