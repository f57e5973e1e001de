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

from lensray.config import LensrayConfig, load_config
from lensray.errors import ConfigError, LensrayError


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
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.epochs=5 (repeatable)",
    )
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
    from lensray.simulate.writer import simulate_dataset

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
    from lensray.ingest.ingest import IngestError, ingest

    try:
        print(ingest(config.data, config.preprocess))
    except IngestError as exc:
        print(f"lensray preprocess: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_store_info(url: str) -> int:
    from lensray.ingest.store import LensStore

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
    from lensray.train.loop import SanityCheckError
    from lensray.train.trainer import TrainError, describe_sanity, run_sanity_check, train

    try:
        if sanity_only:
            print(describe_sanity(run_sanity_check(config)))
            return 0
        print(train(config, resume=resume))
    except (TrainError, SanityCheckError) as exc:
        print(f"lensray train: {exc}", file=sys.stderr)
        return 1
    return 0


TUNE_FLAGS = (
    Flag("--store", "data.store", "URL of the preprocessed store every trial trains on"),
    Flag("--num-samples", "search.num_samples", "samples of the search space (each grid point this often)", int),
    Flag("--storage", "search.storage", "experiment root (local path or s3://); default train.out or ./runs"),
    Flag("--name", "search.name", "experiment name under --storage (needed for --resume)"),
    Flag(
        "--max-concurrent", "search.max_concurrent_trials", "trials at once (default: as many as the cluster fits)", int
    ),
    Flag("--epochs", "train.epochs", "epochs per trial (ASHA's max_t)", int),
)


def cmd_tune(config_path: str | None, overrides: list[str], *, resume: bool) -> int:
    from lensray import storage
    from lensray.config import dump_config
    from lensray.train.tune import BEST_CONFIG_FILE, SearchError, load_tune_config, run_tune

    if config_path is None:
        raise ConfigError("--config is required: a tune file such as tune_configs/lastro_kernels_pools.yaml")
    try:
        outcome = run_tune(load_tune_config(config_path, overrides), resume=resume)
    except SearchError as exc:
        print(f"lensray tune: {exc}", file=sys.stderr)
        return 1
    print(outcome)
    print(f"TensorBoard of every trial: tensorboard --logdir {outcome.experiment_url}")
    if outcome.best_config is not None:
        saved = storage.join(outcome.experiment_url, BEST_CONFIG_FILE)
        print(f"\n# The best trial's run config, saved as {saved}: lensray train --config <this YAML>\n")
        print(dump_config(outcome.best_config))
    if outcome.summary.unfinished:
        name = outcome.experiment_url.rsplit("/", 1)[-1]
        print(
            f"lensray tune: interrupted; continue with: lensray tune --config {config_path} --name {name} --resume",
            file=sys.stderr,
        )
        return 130
    return 0


EVALUATE_FLAGS = (Flag("--store", "data.store", "URL of the preprocessed store to evaluate on"),)


def cmd_evaluate(config: LensrayConfig, args: argparse.Namespace) -> int:
    from lensray.evaluate.evaluate import EvaluateError, evaluate_run
    from lensray.evaluate.score import ScoreError

    if config.data.store is None:
        raise ConfigError("data.store is required (--store URL)")
    try:
        print(
            evaluate_run(
                args.run,
                config.data.store,
                args.out,
                args.split,
                args.tta,
                device="cuda" if args.gpu else "cpu",
                prevalence=args.prevalence,
                gallery=args.gallery,
            )
        )
    except (EvaluateError, ScoreError) as exc:
        print(f"lensray evaluate: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lensray.evaluate.compare import compare_runs
    from lensray.evaluate.evaluate import EvaluateError

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    try:
        print(
            compare_runs(
                args.runs,
                args.out,
                split=args.split,
                tta=args.tta,
                names=names,
                store=args.store,
                device="cuda" if args.gpu else "cpu",
            )
        )
    except EvaluateError as exc:
        print(f"lensray compare: {exc}", file=sys.stderr)
        return 1
    return 0


SCORE_FLAGS = (
    Flag("--images", "data.images", "root URL of the raw FITS cutouts (EUC_VIS/, EUC_Y/, ...)"),
    Flag("--catalog", "data.catalog", "URL of the catalogue: the challenge CSV or any CSV with an ID column"),
)


def cmd_score(config: LensrayConfig, args: argparse.Namespace) -> int:
    from lensray.evaluate.evaluate import EvaluateError
    from lensray.evaluate.score import ScoreError, score_catalog

    if config.data.images is None or config.data.catalog is None:
        raise ConfigError("data.images and data.catalog are required (--images URL --catalog URL)")
    try:
        print(
            score_catalog(
                args.run,
                config.data.images,
                config.data.catalog,
                args.out,
                tta=args.tta,
                device=args.device,
                actors=args.actors,
                batch_size=args.batch_size,
                gallery=args.gallery,
            )
        )
    except (ScoreError, EvaluateError) as exc:  # EvaluateError: --run is neither a checkpoint nor a run folder
        print(f"lensray score: {exc}", file=sys.stderr)
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

    tune = sub.add_parser("tune", help="Ray Tune search with ASHA early stopping over a YAML search space")
    _add_flags(tune, TUNE_FLAGS)
    tune.add_argument("--resume", action="store_true", help="continue the interrupted search --name")
    tune.set_defaults(
        handler=lambda args: cmd_tune(
            args.config, [*args.overrides, *_flag_overrides(args, TUNE_FLAGS)], resume=args.resume
        )
    )

    evaluate = sub.add_parser("evaluate", help="metrics, curves, galleries and an HTML report for a split")
    _add_flags(evaluate, EVALUATE_FLAGS)
    evaluate.add_argument("--run", required=True, help="checkpoint URL, or a run folder (its best checkpoint)")
    evaluate.add_argument(
        "--out", required=True, help="folder (local path or s3://prefix) for report.html, metrics.json, PNGs"
    )
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    evaluate.add_argument("--tta", choices=("d4",), help="average the scores over the 8 rotations/flips")
    evaluate.add_argument("--gpu", action="store_true", help="run the network on the GPU (default: CPU)")
    evaluate.add_argument("--prevalence", type=float, default=1e-4, help="lens fraction in a survey (default 1e-4)")
    evaluate.add_argument("--gallery", type=int, default=8, help="objects per gallery (default 8)")
    evaluate.set_defaults(handler=lambda args: cmd_evaluate(_resolve(args, EVALUATE_FLAGS), args))

    compare = sub.add_parser("compare", help="a Table-I-style comparison of runs with overlaid ROC curves")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="checkpoint URLs or run folders (best checkpoint)")
    compare.add_argument(
        "--out", required=True, help="folder (local path or s3://prefix) for compare.md, compare.html, compare.json"
    )
    compare.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    compare.add_argument("--tta", choices=("d4",), help="average the scores over the 8 rotations/flips")
    compare.add_argument("--names", help="comma-separated row names (default: the run folders' names)")
    compare.add_argument("--store", help="evaluate every run on this store (default: each run's training store)")
    compare.add_argument("--gpu", action="store_true", help="run the networks on the GPU (default: CPU)")
    compare.set_defaults(handler=cmd_compare)

    score = sub.add_parser("score", help="score a catalogue of raw cutouts -> ranked candidates (Ray Data)")
    _add_flags(score, SCORE_FLAGS)
    score.add_argument("--run", required=True, help="checkpoint URL, or a run folder (its best checkpoint)")
    score.add_argument(
        "--out", required=True, help="candidates Parquet URL (local or s3://); siblings: _rejects.csv, ..."
    )
    score.add_argument("--tta", choices=("d4",), help="average the scores over the 8 rotations/flips (kept per view)")
    score.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: GPUs when Ray has them")
    score.add_argument("--actors", type=int, help="model replicas (default: one per GPU, else half the CPUs)")
    score.add_argument("--batch-size", type=int, default=64, help="cutouts per batch (default 64)")
    score.add_argument("--gallery", type=int, default=24, help="top candidates in the HTML gallery (default 24)")
    score.set_defaults(handler=lambda args: cmd_score(_resolve(args, SCORE_FLAGS), args))

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
    except LensrayError as exc:
        print(f"lensray {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
