"""Training overhead: Ray Train vs the plain loop, feeding vs model, 2 workers vs 1 — in one run.

All on one synthetic store (4 x 50 x 50 float16, the CPU demo's geometry) with the LASTRO default:
- plain ``loop.train_one_epoch`` in this process (1 torch thread, like one Ray worker with 1 CPU) vs
  ``lensray train`` with 1 worker: target overhead <= 10 % in steady state (first epoch excluded);
- the RAM feed with D4 augmentation alone vs the model's forward+backward: target >= 20x;
- 2 workers (DDP over gloo, 1 CPU each, same global batch) vs 1 worker on CPU.

    python benchmarks/train_overhead.py [--n 2048] [--epochs 4] [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lensray.config import load_config
from lensray.ingest.store import SPLITS, create_store, finalize_store, shard_ranges, write_shard
from lensray.models import build_model
from lensray.train.feed import WorkerFeed
from lensray.train.loop import make_optimizer, train_one_epoch
from lensray.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SIZE, CHANNELS = 50, 4


def make_store(url: str, n: int) -> None:
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 2).astype(np.int8)
    split = np.where(np.arange(n) % 10 == 0, SPLITS["val"], SPLITS["train"]).astype(np.int8)
    meta = {
        "preprocess": {"synthetic": True},
        "label_rule": "paper",
        "bands": ["VIS", "Y", "J", "H"],
        "source": {"images": "synthetic"},
    }
    create_store(
        url,
        ids=np.arange(n) + 1,
        labels=labels,
        split=split,
        channels=CHANNELS,
        size=SIZE,
        dtype="float16",
        shard_size=256,
        meta=meta,
    )
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    ring = np.exp(-((np.hypot(yy, xx) - 10.0) ** 2) / 6.0)
    for index, (lo, hi) in enumerate(shard_ranges(n, 256)):
        images = rng.normal(0, 1, (hi - lo, CHANNELS, SIZE, SIZE))
        images[labels[lo:hi] == 1] += 0.5 * ring
        write_shard(url, index, images, np.ones(hi - lo, bool), [])
    finalize_store(url)


def config_for(store: str, out: str, name: str, epochs: int, steps: int, workers: int):
    return load_config(
        ROOT / "configs" / "lastro.yaml",
        [
            f"data.store={store}",
            f"train.out={out}",
            f"train.name={name}",
            f"train.epochs={epochs}",
            f"train.steps_per_epoch={steps}",
            "train.sanity=false",
            "train.early_stopping_patience=null",
            f"resources.num_workers={workers}",
            "resources.cpus_per_worker=1",
        ],
    )


def plain_loop_rate(config, epochs: int) -> float:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(config.model, CHANNELS, SIZE)
    optimizer = make_optimizer(model, config.optim)
    feed = WorkerFeed(config.data.store, config.train)
    rates = []
    for epoch in range(epochs):
        feed.set_epoch(epoch)
        rates.append(train_one_epoch(model, feed, optimizer, device="cpu")["samples_per_s"])
    return float(np.mean(rates[1:]))


def feed_vs_model(config, batches: int = 200) -> tuple[float, float]:
    torch.set_num_threads(1)
    feed = WorkerFeed(config.data.store, config.train.model_copy(update={"steps_per_epoch": batches}))
    feed.set_epoch(0)
    start = time.perf_counter()
    held = [b for b in feed]
    feed_rate = len(held) / (time.perf_counter() - start)
    model = build_model(config.model, CHANNELS, SIZE)
    optimizer = make_optimizer(model, config.optim)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    for images, labels in held[:40]:
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()
    model_rate = 40 / (time.perf_counter() - start)
    return feed_rate, model_rate


def ray_rate(config) -> float:
    history = train(config).history
    return float(np.mean([row["samples_per_s"] for row in history[1:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "bench.zarr")
        make_store(store, args.n)
        one = config_for(store, str(Path(tmp) / "runs"), "one", args.epochs, args.steps, 1)
        plain = plain_loop_rate(one, args.epochs)
        feed, model = feed_vs_model(one)
        ray_one = ray_rate(one)
        two = config_for(store, str(Path(tmp) / "runs"), "two", args.epochs, args.steps // 2, 2)
        ray_two = ray_rate(two)
    print(f"\nLASTRO, 4 x {SIZE} x {SIZE}, global batch {one.train.batch_size}, CPU, 1 torch thread per worker")
    print(f"plain loop           {plain:8.1f} img/s")
    print(f"Ray Train, 1 worker  {ray_one:8.1f} img/s   overhead {100 * (1 - ray_one / plain):5.1f} % (target <= 10 %)")
    print(f"Ray Train, 2 workers {ray_two:8.1f} img/s   scaling {ray_two / ray_one:5.2f}x over 1 worker")
    print(
        f"RAM feed + D4        {feed:8.1f} batches/s vs model fwd+bwd {model:.1f} batches/s: {feed / model:.0f}x (target >= 20x)"
    )


if __name__ == "__main__":
    main()
