"""GPU throughput per network at full size (4 x 200 x 200), in one run on a CUDA machine:
- training img/s of every registered network with AMP (bf16 where supported), plain torch on 1 GPU,
  and with DDP over all GPUs (torchrun-free: one process per GPU via torch.multiprocessing) when
  there are more;
- inference img/s (eval mode, AMP, no grad);
- Ray Train (``lensray train`` with 1 GPU worker) vs the plain loop for the default network, on a
  synthetic store: the ratio is Ray's overhead on GPU.
Ratios are against numbers measured in the same run. Without a GPU it says so and exits 0.

    python benchmarks/gpu.py [--batch 128] [--steps 30] [--networks lastro,twobranch] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from lensray.config import ModelConfig, load_config
from lensray.models import MODELS, build_model
from lensray.train.loop import amp_settings, make_optimizer, train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
SIZE, CHANNELS, PIXEL_SCALE = 200, 4, 0.1  # full-size VIS grid, bin 1


def _batches(batch: int, steps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images = torch.randn(batch, CHANNELS, SIZE, SIZE, device=device)
    labels = (torch.arange(batch, device=device) % 2).float()
    return [(images, labels)] * steps


def train_rate(name: str, batch: int, steps: int, device: torch.device, model: torch.nn.Module | None = None) -> float:
    """Steady-state training img/s (a warm-up epoch first, then one timed epoch)."""
    torch.manual_seed(0)
    model = model or build_model(ModelConfig(name=name), CHANNELS, SIZE, PIXEL_SCALE).to(device)
    optimizer = make_optimizer(model, load_config().optim)
    amp_dtype, scaler = amp_settings("auto", device)
    train_one_epoch(model, _batches(batch, 3, device), optimizer, device=device, amp_dtype=amp_dtype, scaler=scaler)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    train_one_epoch(model, _batches(batch, steps, device), optimizer, device=device, amp_dtype=amp_dtype, scaler=scaler)
    torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start)


@torch.no_grad()
def inference_rate(name: str, batch: int, steps: int, device: torch.device) -> float:
    model = build_model(ModelConfig(name=name), CHANNELS, SIZE, PIXEL_SCALE).to(device).eval()
    amp_dtype, _ = amp_settings("auto", device)
    images = torch.randn(batch, CHANNELS, SIZE, SIZE, device=device)
    with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for _ in range(3):
            model(images)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(images)
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def _ddp_worker(rank: int, world: int, name: str, batch: int, steps: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    model = build_model(ModelConfig(name=name), CHANNELS, SIZE, PIXEL_SCALE).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    rate = train_rate(name, batch // world, steps, device, model=ddp)
    out[rank] = rate
    torch.distributed.destroy_process_group()


def ddp_rate(name: str, batch: int, steps: int, world: int) -> float:
    """Global training img/s with DDP over ``world`` GPUs at the same global batch."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(world, name, batch, steps, 29512, out), nprocs=world, join=True)
        return float(sum(out.values()))


def ray_vs_plain(batch: int, steps: int, epochs: int = 3) -> tuple[float, float]:
    """(plain loop img/s, Ray Train 1-GPU-worker img/s) of the default network on a synthetic store."""
    import ray

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_overhead import make_store

    from lensray.train.feed import WorkerFeed
    from lensray.train.trainer import train

    ray.init(log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "bench.zarr")
        make_store(store, 4096)
        config = load_config(
            ROOT / "configs" / "lastro.yaml",
            [
                f"data.store={store}",
                f"train.out={tmp}/runs",
                "train.name=gpu",
                f"train.epochs={epochs}",
                f"train.steps_per_epoch={steps}",
                f"train.batch_size={batch}",
                "train.sanity=false",
                "train.early_stopping_patience=null",
                "resources.use_gpu=true",
            ],
        )
        device = torch.device("cuda", 0)
        model = build_model(config.model, 4, 50).to(device)
        optimizer = make_optimizer(model, config.optim)
        amp_dtype, scaler = amp_settings(config.train.amp, device)
        feed = WorkerFeed(store, config.train, pin_memory=True)
        rates = []
        for epoch in range(epochs):
            feed.set_epoch(epoch)
            stats = train_one_epoch(model, feed, optimizer, device=device, amp_dtype=amp_dtype, scaler=scaler)
            rates.append(stats["samples_per_s"])
        plain = sum(rates[1:]) / len(rates[1:])
        history = train(config).history
        ray_rate = sum(row["samples_per_s"] for row in history[1:]) / len(history[1:])
    ray.shutdown()
    return plain, ray_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--networks", default=",".join(sorted(MODELS)))
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Train vs plain torch comparison")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured.")
        return 0
    device, gpus = torch.device("cuda", 0), torch.cuda.device_count()
    torch.backends.cudnn.benchmark = True
    amp_dtype, _ = amp_settings("auto", device)
    print(f"{torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}, AMP {amp_dtype}, batch {args.batch}")
    print(f"{CHANNELS} x {SIZE} x {SIZE} inputs; img/s (ratio to lastro in this run)")
    rows = {}
    for name in args.networks.split(","):
        rows[name] = (
            train_rate(name, args.batch, args.steps, device),
            inference_rate(name, args.batch, args.steps, device),
        )
    base = rows.get("lastro", next(iter(rows.values())))
    for name, (train_ips, infer_ips) in rows.items():
        line = f"{name:10s} train {train_ips:9.0f} ({train_ips / base[0]:4.2f}x)  infer {infer_ips:9.0f} ({infer_ips / base[1]:4.2f}x)"
        if gpus > 1:
            ddp = ddp_rate(name, args.batch, args.steps, gpus)
            line += f"  DDP x{gpus} train {ddp:9.0f} ({ddp / train_ips:4.2f}x of 1 GPU)"
        print(line, flush=True)
    if not args.no_ray:
        plain, ray_rate = ray_vs_plain(args.batch, args.steps)
        print(
            f"lastro 4x50x50 store, 1 GPU: plain loop {plain:.0f} img/s, Ray Train {ray_rate:.0f} img/s "
            f"(overhead {100 * (1 - ray_rate / plain):.1f} %)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
