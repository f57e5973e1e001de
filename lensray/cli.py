"""The ``lensray`` command: parses arguments, loads the config, calls one function per subcommand.

Every flag is a shorthand for a config key, so ``--n 500`` and ``--set simulate.n=500`` are the same
thing and a YAML file (``--config``) can hold any of them. The same commands run locally and under
``ray job submit``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lensray.config import ConfigError, LensrayConfig, load_config


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key."""

    flag: str
    key: str
    help: str
    type: Callable[[str], object] = str
    is_list: bool = False  # comma-separated on the command line, a YAML list in the config
    is_switch: bool = False


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    parser.add_argument("--config", help="YAML run config (sections: data, preprocess, model, ...)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.epochs=5 (repeatable)",
    )  # fmt: skip
    for flag in flags:
        if flag.is_switch:
            parser.add_argument(flag.flag, action="store_true", default=None, help=f"{flag.help} [{flag.key}]")
        else:
            parser.add_argument(flag.flag, type=flag.type, default=None, help=f"{flag.help} [{flag.key}]")


def _flag_overrides(args: argparse.Namespace, flags: Sequence[Flag]) -> list[str]:
    overrides = []
    for flag in flags:
        value = getattr(args, flag.flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if flag.is_list:
            items = [item.strip() for item in str(value).split(",") if item.strip()]
            overrides.append(f"{flag.key}=[{', '.join(items)}]")
        elif flag.is_switch:
            overrides.append(f"{flag.key}=true")
        else:
            overrides.append(f"{flag.key}={value}")
    return overrides


def _resolve(args: argparse.Namespace, flags: Sequence[Flag]) -> LensrayConfig:
    # Flags after --set: an explicit flag on the command line is the most specific request.
    return load_config(args.config, [*args.overrides, *_flag_overrides(args, flags)])


SIMULATE_FLAGS = (
    Flag("--out", "simulate.out", "root URL of the data set (path or s3://bucket/prefix)"),
    Flag("--n", "simulate.n", "number of objects", int),
    Flag("--seed", "simulate.seed", "random seed (output is identical for a seed)", int),
    Flag("--lens-fraction", "simulate.lens_fraction", "fraction of objects with a lensed source", float),
    Flag("--workers", "simulate.workers", "parallel Ray tasks (default: all CPUs)", int),
)


def cmd_simulate(config: LensrayConfig) -> int:
    from lensray.simulate import simulate_dataset

    if config.simulate.out is None:
        raise ConfigError("simulate.out is required (--out URL)")
    summary = simulate_dataset(config.simulate)
    print(summary)
    return 0


PREPROCESS_FLAGS = (
    Flag("--images", "data.images", "root URL of the raw FITS cutouts (EUC_VIS/, EUC_Y/, ...)"),
    Flag("--catalog", "data.catalog", "URL of the challenge catalogue CSV"),
    Flag("--out", "preprocess.out", "URL of the Zarr store to write (path or s3://)"),
    Flag("--mode", "preprocess.mode", "asinh (default) | log | clip"),
    Flag("--bands", "data.bands", "comma-separated subset of VIS,Y,J,H", is_list=True),
    Flag("--labels", "data.labels", "label rule: paper | official | challenge"),
    Flag("--nan", "data.nan", "NaN pixels: zero | reject"),
    Flag("--dtype", "preprocess.dtype", "float16 | float32"),
    Flag("--crop", "preprocess.crop", "central crop in VIS pixels", int),
    Flag("--bin", "preprocess.bin", "integer binning after the crop", int),
    Flag("--shard-size", "preprocess.shard_size", "samples per Zarr shard (one Ray task each)", int),
    Flag("--limit", "preprocess.limit", "ingest only the first N IDs (sorted)", int),
    Flag("--workers", "preprocess.workers", "concurrent Ray tasks (default: all CPUs)", int),
    Flag("--strict", "preprocess.strict", "fail when any cutout is rejected", is_switch=True),
)


def cmd_preprocess(config: LensrayConfig) -> int:
    from lensray.pipeline import IngestError, ingest

    try:
        print(ingest(config.data, config.preprocess))
    except IngestError as exc:
        print(f"lensray preprocess: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_store_info(url: str) -> int:
    from lensray.store import LensStore

    print(LensStore.open(url).info())
    return 0


TRAIN_FLAGS = (
    Flag("--store", "data.store", "URL of the preprocessed store to train on"),
    Flag("--model", "model.name", "lastro | resnet"),
    Flag("--epochs", "train.epochs", "maximum epochs", int),
    Flag("--batch-size", "train.batch_size", "global batch size (split across workers)", int),
    Flag("--steps-per-epoch", "train.steps_per_epoch", "batches per epoch per worker", int),
    Flag("--lr", "optim.lr", "learning rate", float),
    Flag("--out", "train.out", "storage path for runs (local path or s3://)"),
    Flag("--name", "train.name", "run name under --out (needed for --resume)"),
    Flag("--workers", "resources.num_workers", "data-parallel workers", int),
    Flag("--gpu", "resources.use_gpu", "one GPU per worker (NCCL); default CPU/gloo", is_switch=True),
    Flag("--max-failures", "train.max_failures", "worker restarts Ray may make", int),
)


def cmd_train(config: LensrayConfig, *, resume: bool, sanity_only: bool) -> int:
    from lensray.loop import SanityCheckError
    from lensray.trainer import TrainError, describe_sanity, run_sanity_check, train

    try:
        if sanity_only:
            print(describe_sanity(run_sanity_check(config)))
            return 0
        print(train(config, resume=resume))
    except (TrainError, SanityCheckError) as exc:
        print(f"lensray train: {exc}", file=sys.stderr)
        return 1
    return 0


DEMO_FLAGS = (
    Flag("--n", "simulate.n", "number of simulated objects", int),
    Flag("--seed", "simulate.seed", "random seed", int),
)


def cmd_demo(config: LensrayConfig, out: str) -> int:
    from lensray.demo import run_demo

    run_demo(config, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lensray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    simulate = sub.add_parser("simulate", help="make a challenge-format data set (lenstronomy)")
    _add_flags(simulate, SIMULATE_FLAGS)
    simulate.set_defaults(handler=lambda args: cmd_simulate(_resolve(args, SIMULATE_FLAGS)))

    preprocess = sub.add_parser("preprocess", help="ingest raw FITS into a preprocessed Zarr store (Ray Data)")
    _add_flags(preprocess, PREPROCESS_FLAGS)
    preprocess.set_defaults(handler=lambda args: cmd_preprocess(_resolve(args, PREPROCESS_FLAGS)))

    store = sub.add_parser("store", help="inspect a preprocessed store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    info = store_sub.add_parser("info", help="counts per split and class, config, rejects")
    info.add_argument("url", help="store URL")
    info.set_defaults(handler=lambda args: cmd_store_info(args.url))

    train = sub.add_parser("train", help="data-parallel training on Ray Train (DDP; GPU or CPU/gloo)")
    _add_flags(train, TRAIN_FLAGS)
    train.add_argument("--resume", action="store_true", help="continue the run --name from its latest checkpoint")
    train.add_argument("--sanity", action="store_true", help="only overfit a small fixed batch and report")
    train.set_defaults(
        handler=lambda args: cmd_train(_resolve(args, TRAIN_FLAGS), resume=args.resume, sanity_only=args.sanity)
    )

    demo = sub.add_parser("demo", help="run the whole chain on a small simulated set, locally")
    _add_flags(demo, DEMO_FLAGS)
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.set_defaults(handler=lambda args: cmd_demo(_demo_config(args), args.out))
    return parser


def _demo_config(args: argparse.Namespace) -> LensrayConfig:
    from lensray.demo import DEMO_CONFIG

    if args.config is None:
        args.config = str(DEMO_CONFIG)
    return _resolve(args, DEMO_FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"lensray {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
