"""The ``lensray`` command: parses arguments, loads the config, calls one function per subcommand.

Every flag is a shorthand for a config key, so ``--n 500`` and ``--set simulate.n=500`` are the same
thing and a YAML file (``--config``, a local path or any URL storage reads) can hold any of them. The
same commands run locally and under ``ray job submit``. Before anything runs, every local path (argument
or config key) is made absolute here on the driver, and the S3 buckets the command uses are checked.
Errors are handled once, in ``main``: a lensray error or a missing file is one line on stderr naming the
object (exit 1), a config or usage error exit 2, Ctrl-C exit 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lensray._version import __version__
from lensray.config import (
    PATH_KEYS,
    LensrayConfig,
    absolute_path,
    config_from_tree,
    read_yaml,
)
from lensray.errors import ConfigError, Interrupted, LensrayError, find_cause
from lensray.profiles import PROFILES

DEVICES = ("auto", "cpu", "cuda")
# Missing or misplaced files and folders: reported like a lensray error, as one line naming the path.
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key."""

    flag: str
    key: str
    help: str
    type: Callable[[str], object] = str
    is_list: bool = False  # comma-separated on the command line, a YAML list in the config
    is_switch: bool = False
    choices: tuple[str, ...] | None = None
    to_value: Callable[[str], object] | None = None  # the config value for the flag's value


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
            parser.add_argument(
                flag.flag, type=flag.type, default=None, choices=flag.choices, help=f"{flag.help} [{flag.key}]"
            )


def _flag_overrides(args: argparse.Namespace, flags: Sequence[Flag]) -> list[str]:
    overrides = []
    for flag in flags:
        value = getattr(args, flag.flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if flag.to_value is not None:
            value = flag.to_value(value)
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
    overrides = [*args.overrides, *_flag_overrides(args, flags)]
    tree = read_yaml(args.config) if args.config is not None else {}
    config = config_from_tree(tree, args.config or "defaults", overrides)
    check_buckets(_values(config, [flag.key for flag in flags if flag.key in PATH_KEYS]))
    return config


# Arguments that hold a path or URL; the config's own (PATH_KEYS) are resolved when it is loaded.
PATH_ARGS = (
    "config",
    "run",
    "runs",
    "members",
    "from_search",
    "out",
    "store",
    "url",
    "images",
    "catalog",
    "storage",
    "rounds",
    "truth",
)


def resolve_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Every local path argument made absolute here, on the driver, before anything runs: Ray workers and
    Tune trials run in folders of their own, where a relative path would name another place."""
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, absolute_path(value))
        elif isinstance(value, list):
            setattr(args, name, [absolute_path(item) for item in value])
    return args


def _values(config: LensrayConfig, keys: Iterable[str]) -> list[str]:
    found = (getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in keys)
    return [value for value in found if value is not None]


def _arg_urls(args: argparse.Namespace) -> list[str]:
    values = (getattr(args, name, None) for name in PATH_ARGS)
    return [v for value in values for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]


def check_buckets(urls: Iterable[str]) -> None:
    """Fail fast, in one line naming the URL, when the bucket of any remote URL the command uses is
    missing, its endpoint cannot be reached or no filesystem reads its scheme (before a cluster
    starts, and before a library deep down reports it as a traceback)."""
    from lensray import storage

    buckets: dict[str, str] = {}
    for url in urls:
        if not storage.is_local(url):
            kind, rest = url.split("://", 1)
            buckets.setdefault(f"{kind}://{rest.split('/', 1)[0]}", url)  # once per bucket (or host)
    for url in buckets.values():
        storage.check_reachable(url, must_exist=False)


def torch_device(choice: str) -> str:
    """``--device`` for a network run on the driver: auto is CUDA when this machine has a GPU."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def use_gpu(choice: str) -> str:
    """``--device`` as ``resources.use_gpu`` for Ray workers: auto is true when this machine or the
    cluster it is connected to (RAY_ADDRESS, e.g. under ``ray job submit``) has GPUs."""
    if choice != "auto":
        return "true" if choice == "cuda" else "false"
    if torch_device("auto") == "cuda":
        return "true"
    if not os.environ.get("RAY_ADDRESS"):
        return "false"  # a local cluster has this machine's GPUs: none
    import ray

    from lensray.runtime import ensure_ray

    ensure_ray()
    return "true" if ray.cluster_resources().get("GPU", 0) > 0 else "false"


def _device_flag(help_text: str) -> Flag:
    return Flag("--device", "resources.use_gpu", help_text, choices=DEVICES, to_value=use_gpu)


SIMULATE_FLAGS = (
    Flag("--out", "simulate.out", "root URL of the data set (path or s3://bucket/prefix)"),
    Flag("--n", "simulate.n", "number of objects", int),
    Flag("--seed", "simulate.seed", "random seed (output is identical for a seed)", int),
    Flag("--lens-fraction", "simulate.lens_fraction", "fraction of objects with a lensed source", float),
    Flag("--workers", "simulate.workers", "parallel Ray tasks (default: all CPUs)", int),
    Flag(
        "--preset",
        "simulate.preset",
        "priors: randomised (training, default) | shifted (evaluation only) | classic",
        choices=("randomised", "shifted", "classic"),
    ),
    Flag(
        "--profile",
        "data.profile",
        "survey layout to write: euclid_challenge (default) | euclid_mer | hsc | lsst (any other: data.profile "
        "in --config)",
        choices=tuple(PROFILES),
    ),
)


def cmd_simulate(config: LensrayConfig) -> int:
    from lensray.simulate.writer import simulate_dataset

    if config.simulate.out is None:
        raise ConfigError("simulate.out is required (--out URL)")
    print(simulate_dataset(config.simulate, config.data.profile))
    return 0


def _yaml_text(value: str) -> str:
    """A flag's text as a YAML string, never read as a number, boolean or null (a column named ``1`` or ``no``)."""
    return json.dumps(value)


def _yaml_texts(value: str) -> str:
    """Comma-separated texts, each a YAML string (see ``_yaml_text``)."""
    return ",".join(json.dumps(item.strip()) for item in value.split(",") if item.strip())


# How the catalogue is read: by `preprocess` (labels for the store) and `score` (IDs and the candidates' columns).
CATALOG_FLAGS = (
    Flag("--catalog-format", "data.catalog_format", "table format", choices=("auto", "csv", "fits", "ecsv", "parquet")),
    Flag("--id-column", "data.id_column", "catalogue column of integer object IDs (default ID)", to_value=_yaml_text),
    Flag(
        "--label-column",
        "data.label_column",
        "catalogue column of labels, 1/0 or true/false (default: the challenge label rule, else unlabelled)",
        to_value=_yaml_text,
    ),
    Flag(
        "--coord-columns",
        "data.coord_columns",
        "RA,Dec columns (degrees), kept as ra, dec",
        is_list=True,
        to_value=_yaml_texts,
    ),
    Flag(
        "--keep-columns",
        "data.keep_columns",
        "comma-separated columns carried to the candidates",
        is_list=True,
        to_value=_yaml_texts,
    ),
)

PREPROCESS_FLAGS = (
    Flag("--images", "data.images", "root URL of the raw FITS cutouts, laid out as --profile says (EUC_VIS/, ...)"),
    Flag(
        "--profile",
        "data.profile",
        "survey layout of the cutouts: euclid_challenge (default), euclid_mer, hsc, lsst (lensray/profiles.py)",
    ),
    Flag("--catalog", "data.catalog", "URL of the catalogue: the challenge CSV, or a CSV/FITS/ECSV/Parquet table"),
    *CATALOG_FLAGS,
    Flag("--out", "preprocess.out", "URL of the Zarr store to write (path or s3://)"),
    Flag("--mode", "preprocess.mode", "asinh (default) | log | clip"),
    Flag(
        "--bands",
        "data.bands",
        "comma-separated subset of the profile's bands (default: all; euclid_challenge: VIS,Y,J,H; hsc: g,r,i,z,y)",
        is_list=True,
    ),
    Flag("--labels", "data.labels", "label rule: paper | official | challenge"),
    Flag("--nan", "data.nan", "NaN pixels: zero | reject"),
    Flag("--dtype", "preprocess.dtype", "float16 | float32"),
    Flag("--crop", "preprocess.crop", "central crop in reference-band pixels (VIS for Euclid)", int),
    Flag("--bin", "preprocess.bin", "integer binning after the crop", int),
    Flag("--shard-size", "preprocess.shard_size", "samples per Zarr shard (one Ray task each)", int),
    Flag("--limit", "preprocess.limit", "ingest only the first N IDs (sorted)", int),
    Flag("--workers", "preprocess.workers", "concurrent Ray tasks (default: all CPUs)", int),
    Flag("--strict", "preprocess.strict", "fail when any cutout is rejected", is_switch=True),
)


def cmd_preprocess(config: LensrayConfig) -> int:
    from lensray.ingest.ingest import ingest

    print(ingest(config.data, config.preprocess))
    return 0


def cmd_store_info(url: str) -> int:
    from lensray.ingest.store import LensStore

    print(LensStore.open(url).info())
    return 0


TRAIN_FLAGS = (
    Flag("--store", "data.store", "URL of the preprocessed store to train on; repeat it to train on several at once"),
    Flag("--model", "model.name", "lastro | resnet"),
    Flag("--epochs", "train.epochs", "maximum epochs", int),
    Flag("--batch-size", "train.batch_size", "global batch size (split across workers)", int),
    Flag("--steps-per-epoch", "train.steps_per_epoch", "batches per epoch per worker", int),
    Flag("--lr", "optim.lr", "learning rate", float),
    Flag("--out", "train.out", "storage path for runs (local path or s3://)"),
    Flag("--name", "train.name", "run name under --out (needed for --resume)"),
    Flag("--workers", "resources.num_workers", "data-parallel workers", int),
    _device_flag("cuda: one GPU per worker (NCCL); cpu: gloo; auto: cuda when GPUs are there (default: the config)"),
    Flag("--max-failures", "train.max_failures", "worker restarts Ray may make", int),
    Flag("--init-from", "train.init_from", "fine-tune: start from this run's best checkpoint (or a checkpoint folder)"),
    Flag("--freeze", "train.freeze", "fine-tune: keep the network's first N blocks fixed", int),
)


class _Stores(argparse.Action):
    """``--store``: one use gives a URL (``data.store``), several a list (``data.stores``, see ``_train_config``)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: Any = None
    ) -> None:
        given = getattr(namespace, self.dest, None)
        setattr(
            namespace, self.dest, value if given is None else [*(given if isinstance(given, list) else [given]), value]
        )


def _train_config(args: argparse.Namespace) -> LensrayConfig:
    """``train``'s config: several ``--store`` (with ``--store-weights w1,w2,...``, default all 1) become
    ``data.stores``; one stays ``data.store`` unless weighted."""
    stores, weights = args.store, args.store_weights
    if isinstance(stores, list) or weights is not None:
        urls = stores if isinstance(stores, list) else [stores] if stores else []
        values = [1.0] * len(urls)
        if weights is not None:
            try:
                values = [float(w) for w in weights.split(",") if w.strip()]
            except ValueError:
                raise ConfigError(f"--store-weights {weights!r}: comma-separated numbers expected") from None
            if len(values) != len(urls):
                raise ConfigError(f"--store-weights gives {len(values)} weights for {len(urls)} --store")
        entries = [{"url": url, "weight": weight} for url, weight in zip(urls, values, strict=True)]
        args = argparse.Namespace(**{**vars(args), "store": None})
        # JSON is YAML: URLs with colons stay strings.
        args.overrides = [*args.overrides, "data.store=", f"data.stores={json.dumps(entries)}"]
    return _resolve(args, TRAIN_FLAGS)


def cmd_train(config: LensrayConfig, *, resume: bool, sanity_only: bool) -> int:
    from lensray.train.trainer import describe_sanity, run_sanity_check, train

    if sanity_only:
        print(describe_sanity(run_sanity_check(config)))
    else:
        print(train(config, resume=resume))
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
    _device_flag("cuda: GPUs for every trial's workers; cpu; auto: cuda when GPUs are there (default: the config)"),
)


def cmd_tune(config_path: str | None, overrides: list[str], *, resume: bool) -> int:
    from lensray import storage
    from lensray.config import dump_config
    from lensray.train.tune import BEST_CONFIG_FILE, load_tune_config, run_tune

    if config_path is None:
        raise ConfigError("--config is required: a tune file such as tune_configs/lastro_kernels_pools.yaml")
    spec = load_tune_config(config_path, overrides)
    check_buckets(_values(spec.run, [flag.key for flag in TUNE_FLAGS if flag.key in PATH_KEYS] + ["train.out"]))
    outcome = run_tune(spec, resume=resume)
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
        return EXIT_INTERRUPTED
    return 0


EVALUATE_FLAGS = (Flag("--store", "data.store", "URL of the preprocessed store to evaluate on"),)


def _model(args: argparse.Namespace) -> Any:
    """``--run URL``, or the ensemble of ``--runs A B C`` / ``--from-search EXP --top K``."""
    from lensray.evaluate.ensemble import resolve_ensemble

    ensemble = resolve_ensemble(args.members, args.from_search, args.top)
    return ensemble if ensemble is not None else args.run


def cmd_evaluate(config: LensrayConfig, args: argparse.Namespace) -> int:
    from lensray.evaluate.evaluate import evaluate_run

    if config.data.store is None:
        raise ConfigError("data.store is required (--store URL)")
    report = evaluate_run(
        _model(args),
        config.data.store,
        args.out,
        args.split,
        args.tta,
        device=torch_device(args.device),
        prevalence=args.prevalence,
        gallery=args.gallery,
    )
    print(report)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lensray.evaluate.compare import compare_runs
    from lensray.evaluate.ensemble import resolve_ensemble

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    ensemble = resolve_ensemble(args.members, args.from_search, args.top)
    if not args.runs and ensemble is None:
        raise ConfigError("compare needs runs (RUN ...) or an ensemble (--runs A B ... or --from-search EXP)")
    table = compare_runs(
        args.runs,
        args.out,
        split=args.split,
        tta=args.tta,
        names=names,
        store=args.store,
        device=torch_device(args.device),
        ensemble=ensemble,
    )
    print(table)
    return 0


SCORE_FLAGS = (
    Flag("--images", "data.images", "root URL of the raw FITS cutouts, in the training store's layout"),
    Flag(
        "--profile",
        "data.profile",
        "survey layout of the cutouts; default: the run's training store's (a different one is an error)",
    ),
    Flag("--catalog", "data.catalog", "URL of the catalogue: the challenge CSV, or a CSV/FITS/ECSV/Parquet table"),
    *CATALOG_FLAGS,
)


def cmd_score(config: LensrayConfig, args: argparse.Namespace) -> int:
    from lensray.evaluate.score import score_catalog

    if config.data.images is None or config.data.catalog is None:
        raise ConfigError("data.images and data.catalog are required (--images URL --catalog URL)")
    candidates = score_catalog(
        _model(args),
        config.data.images,
        config.data.catalog,
        args.out,
        tta=args.tta,
        device=args.device,
        actors=args.actors,
        batch_size=args.batch_size,
        gallery=args.gallery,
        data=config.data,
        part_size=args.part_size,
        fresh=args.fresh,
        # Only an explicit --profile is checked against the run's: a saved config always names one.
        profile=config.data.profile if args.profile is not None else None,
    )
    print(candidates)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lensray.evaluate.export import export_model

    print(export_model(args.run, args.out, evaluation=args.evaluation))
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    from lensray.grade.server import check_host, grading_session, serve

    check_host(args.host, args.allow_remote)  # before anything is read: a refused host fails at once
    bands = tuple(b.strip() for b in args.bands.split(",") if b.strip()) if args.bands else None
    session = grading_session(
        args.candidates,
        args.out,
        images_url=args.images,
        bands=bands,
        order=args.order,
        top=args.top,
        random_low=args.random_low,
        seed=args.seed,
        grader=args.grader,
    )
    server = serve(session, args.host, args.port, args.allow_remote)
    done, total = session.progress()
    print(f"grading {session.selection.describe()} as {session.grader}: {done:,} of {total:,} graded")
    print(f"  page: {server.url}")
    print(f"  grades: {session.book.out} (journal {session.book.journal}); Ctrl-C stops, the same command resumes")
    if args.open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        while server.thread.is_alive():
            server.thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    done, total = session.progress()
    print(f"stopped: {done:,} of {total:,} graded, in {session.book.out}")
    return 0


def cmd_grade_merge(args: argparse.Namespace) -> int:
    from lensray.grade.grades import merge_grades

    print(merge_grades(args.grades, args.out))
    return 0


def cmd_grades_to_catalog(args: argparse.Namespace) -> int:
    from lensray.grade.grades import grades_to_catalog

    print(grades_to_catalog(args.grades, args.out))
    return 0


def cmd_report_loop(args: argparse.Namespace) -> int:
    from lensray.grade.report import loop_report

    print(loop_report(args.rounds, args.out, top=args.top, truth_url=args.truth, truth_column=args.truth_column))
    return 0


DEMO_FLAGS = (
    Flag("--n", "simulate.n", "number of simulated objects", int),
    Flag("--seed", "simulate.seed", "random seed", int),
)


def cmd_demo(config: LensrayConfig, out: str) -> int:
    from lensray.demo import run_demo

    run_demo(config, out)
    return 0


def _demo_config(args: argparse.Namespace) -> LensrayConfig:
    from lensray.demo import DEMO_CONFIG

    if args.config is None:
        args.config = str(DEMO_CONFIG)
    return _resolve(args, DEMO_FLAGS)


# -- the parser ------------------------------------------------------------------------------------------

HELP = {  # subcommand: (one-line help, description, examples)
    "simulate": (
        "make a simulated data set, challenge format or any survey profile (lenstronomy)",
        "Simulate a Bologna-challenge-format data set: one FITS file per object and band (VIS, Y, J, H) and the "
        "catalogue CSV, with the real data's quirks. Written locally or to s3://. With --profile, the files of a "
        "survey profile in its own layout (bands, pixel scales, multi-extension or .fz files, WCS headers) and "
        "catalog.parquet (ID, ra, dec, is_lens, mag_<band>) beside truth.csv.",
        "lensray simulate --out data/ --n 1200 --seed 7\nlensray simulate --out s3://bucket/sim --n 20000 --workers 8"
        "\nlensray simulate --out hsc/ --n 500 --profile hsc",
    ),
    "preprocess": (
        "ingest raw FITS into a preprocessed Zarr store (Ray Data)",
        "Read the catalogue and the FITS cutouts, preprocess them once (crop, bin, stretch) and write one Zarr store "
        "with train/val/test splits. Resumable: the same command skips finished shards.",
        "lensray preprocess --images data/ --catalog data/image_catalog2.0train.csv --out store.zarr\n"
        "lensray preprocess --config configs/lastro.yaml --labels challenge --crop 100 --bin 2 "
        "--images s3://b/raw --catalog s3://b/raw/image_catalog2.0train.csv --out s3://b/store.zarr",
    ),
    "store": ("inspect a preprocessed store", "Inspect a preprocessed Zarr store.", "lensray store info store.zarr"),
    "train": (
        "data-parallel training on Ray Train (DDP; GPU or CPU/gloo)",
        "Train a CNN with Ray Train (DDP over --workers workers). A checkpoint every epoch under --out/--name; "
        "history.json and TensorBoard logs beside them.",
        "lensray train --config configs/lastro.yaml --store store.zarr --name lastro-1\n"
        "lensray train --config configs/resnet.yaml --store s3://b/store.zarr --out s3://b/runs --workers 4 "
        "--device cuda\nlensray train --config configs/lastro.yaml --store store.zarr --name lastro-1 --resume",
    ),
    "tune": (
        "Ray Tune search with ASHA early stopping over a YAML search space",
        "Search a space of run configs with Ray Tune, stopping trailing trials early with ASHA. Prints the best "
        "trial's run config as YAML for `lensray train --config`.",
        "lensray tune --config tune_configs/lastro_kernels_pools.yaml --store store.zarr --storage s3://b/experiments\n"
        "lensray tune --config tune_configs/lastro_kernels_pools.yaml --name lastro-kernels --resume",
    ),
    "evaluate": (
        "metrics, curves, galleries and an HTML report for a split",
        "Score one run (or an ensemble: --runs, --from-search) on a split of a store and write report.html, metrics.json, predictions.csv and the plots.",
        "lensray evaluate --run runs/lastro-1 --store store.zarr --out eval/\n"
        "lensray evaluate --run s3://b/runs/lastro-1 --store s3://b/store.zarr --tta d4 --out s3://b/eval\n"
        "lensray evaluate --from-search experiments/lastro-search --top 3 --store store.zarr --out eval-ensemble/",
    ),
    "compare": (
        "a Table-I-style comparison of runs with overlaid ROC curves",
        "Score several runs on the test split of their stores: ACC, AUC, TPR0, TPR10, epochs, images seen, "
        "training time, paired AUC differences and overlaid ROC curves. With an ensemble (--runs A B C, or "
        "--from-search EXP --top K): its row, its members' rows, and the ensemble against its best member.",
        "lensray compare runs/study_* runs/platform_lastro_* --out compare/\n"
        "lensray compare --runs runs/lastro-1 runs/lastro-2 runs/resnet-1 --out compare-ensemble/",
    ),
    "score": (
        "score a catalogue of raw cutouts -> ranked candidates (Ray Data)",
        "Score every cutout of a catalogue with a trained run (or an ensemble: --runs A B C, --from-search EXP "
        "--top K; its score is the members' mean, score_std their spread) and write the ranked candidates (Parquet) with an "
        "HTML gallery of the top ones.",
        "lensray score --run runs/lastro-1 --images s3://b/raw --catalog s3://b/raw/ids.csv "
        "--out s3://b/candidates.parquet\n"
        "lensray score --run runs/lastro-1 --images cutouts/ --catalog survey.fits --id-column objid "
        "--coord-columns RA_deg,DEC_deg --keep-columns mag_r --out candidates.parquet\n"
        "lensray score --runs runs/lastro-1 runs/lastro-2 runs/resnet-1 --tta d4 --images cutouts/ "
        "--catalog ids.csv --out candidates.parquet",
    ),
    "export": (
        "export a trained model (safetensors + its input contract) for use without a cluster",
        "Write a run's best checkpoint (or a checkpoint, or a search's best trial) as model.safetensors, model.json "
        "(network, bands, pixel scales, preprocessing, source and AUC) and config.yaml; "
        "lensray.load_model(DIR).predict_cutouts(...) then scores raw FITS in a notebook, with no store and no Ray.",
        "lensray export runs/lastro-1 --out models/lastro-1\n"
        "lensray export s3://b/experiments/lastro-search --out s3://b/models/lastro-best --evaluation eval/",
    ),
    "grade": (
        "grade candidates by eye on a local web page (A/B/C/X), saved at once, resumable",
        "Serve a page on loopback that shows the candidates of `lensray score` one at a time or as a grid (every "
        "band and a colour composite, score and uncertainty) and takes Euclid's grades by key: A sure lens, B "
        "probable, C possible, X not a lens, with a free note. Every grade is appended to <out stem>_journal.jsonl "
        "(fsynced) and the Parquet --out is rewritten atomically; the same command continues where it stopped.",
        "lensray grade --candidates candidates.parquet --out grades.parquet\n"
        "lensray grade --candidates s3://b/candidates.parquet --images s3://b/raw --out grades.parquet "
        "--order uncertainty --top 2000 --random-low 200 --grader ana",
    ),
    "grade-merge": (
        "merge graders' grades files",
        "Merge grades files: a later grade of one ID by one grader replaces the earlier; different graders' "
        "grades of one ID are kept as separate rows (column grader).",
        "lensray grade-merge ana.parquet ben.parquet --out grades.parquet",
    ),
    "grades-to-catalog": (
        "a grades file -> a labelled catalogue for `lensray preprocess`",
        "Turn grades into a labelled catalogue (Parquet: ID, label, ra/dec when known): A/B -> 1, X -> 0, C left "
        "out; with several graders, the majority of their A/B and X votes (an even split is left out).",
        "lensray grades-to-catalog grades.parquet --out labels.parquet\n"
        "lensray preprocess --catalog labels.parquet --label-column label --images raw/ --out graded.zarr",
    ),
    "report-loop": (
        "the discovery loop's rounds: purity in the top N per round, how the ranking changed",
        "Report on the rounds of a discovery loop, oldest first. Each ROUND folder holds that round's "
        "candidates.parquet (lensray score --out ROUND/candidates.parquet) and, once graded, its grades.parquet "
        "(lensray grade --out ROUND/grades.parquet). Per round: lenses (A/B) among the graded top N, both among "
        "the first N not graded in an earlier round (fresh: the honest figure) and the whole top N; with --truth, "
        "the true purities too; between rounds: top-N overlap, Spearman correlation, IDs that entered / left. "
        "Writes report.md, report.json and purity.png into --out.",
        "lensray report-loop round0 round1 round2 --out loop_report --top 100\n"
        "lensray report-loop sim/round* --out loop_report --truth sim/survey/truth.csv",
    ),
    "demo": (
        "run the whole chain on a small simulated set, locally",
        "Simulate, ingest, train, search, compare and evaluate on a small simulated set on a local Ray instance "
        "(about 2 minutes on 2 CPU cores). Everything lands in --out.",
        "lensray demo\nlensray demo --out /tmp/demo --n 400 --set train.epochs=3",
    ),
}


def _common() -> argparse.ArgumentParser:
    """-v/-q, accepted before and after the subcommand (SUPPRESS: a subcommand does not reset the top level)."""
    common = argparse.ArgumentParser(add_help=False)
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logs, Ray's own output, tracebacks",
    )
    loudness.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only, no progress bars"
    )
    return common


def _subparser(sub: argparse._SubParsersAction, name: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    summary, description, examples = HELP[name]
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples.splitlines())
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="lensray",
        description="Strong-lens finding in Euclid-like cutouts with CNNs on Ray: simulate -> preprocess -> train "
        "| tune -> evaluate | compare | score.",
        epilog="`lensray COMMAND -h` explains each command. Exit status: 0 ok, 1 a lensray error or missing file, "
        "2 usage or config error, 130 interrupted.",
        parents=[_common()],  # its own -v/-q actions: set_defaults below must not reach the subcommands' ones
    )
    parser.add_argument("--version", action="version", version=f"lensray {__version__}")
    parser.set_defaults(verbose=False, quiet=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    simulate = _subparser(sub, "simulate", common)
    _add_flags(simulate, SIMULATE_FLAGS)
    simulate.set_defaults(handler=lambda args: cmd_simulate(_resolve(args, SIMULATE_FLAGS)))

    preprocess = _subparser(sub, "preprocess", common)
    _add_flags(preprocess, PREPROCESS_FLAGS)
    preprocess.set_defaults(handler=lambda args: cmd_preprocess(_resolve(args, PREPROCESS_FLAGS)))

    store = _subparser(sub, "store", common)
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    info = store_sub.add_parser("info", help="counts per split and class, config, rejects", parents=[common])
    info.add_argument("url", help="store URL")
    info.set_defaults(handler=lambda args: cmd_store_info(args.url))

    train = _subparser(sub, "train", common)
    _add_flags(train, [flag for flag in TRAIN_FLAGS if flag.flag != "--store"])
    train.add_argument(
        "--store", action=_Stores, default=None, help=f"{TRAIN_FLAGS[0].help} [data.store / data.stores]"
    )
    train.add_argument(
        "--store-weights",
        default=None,
        help="with several --store: each one's share of the training samples, e.g. 0.8,0.2 [data.stores]",
    )
    train.add_argument("--resume", action="store_true", help="continue the run --name from its latest checkpoint")
    train.add_argument("--sanity", action="store_true", help="only overfit a small fixed batch and report")
    train.set_defaults(handler=lambda args: cmd_train(_train_config(args), resume=args.resume, sanity_only=args.sanity))

    tune = _subparser(sub, "tune", common)
    _add_flags(tune, TUNE_FLAGS)
    tune.add_argument("--resume", action="store_true", help="continue the interrupted search --name")
    tune.set_defaults(
        handler=lambda args: cmd_tune(
            args.config, [*args.overrides, *_flag_overrides(args, TUNE_FLAGS)], resume=args.resume
        )
    )

    _add_evaluate(_subparser(sub, "evaluate", common))
    _add_compare(_subparser(sub, "compare", common))
    _add_score(_subparser(sub, "score", common))
    _add_export(_subparser(sub, "export", common))

    _add_grade(_subparser(sub, "grade", common))
    merge = _subparser(sub, "grade-merge", common)
    merge.add_argument("grades", nargs="+", metavar="GRADES", help="grades Parquet files (local or URLs)")
    merge.add_argument("--out", required=True, help="merged grades Parquet (local or URL)")
    merge.set_defaults(handler=cmd_grade_merge)
    to_catalog = _subparser(sub, "grades-to-catalog", common)
    to_catalog.add_argument("grades", metavar="GRADES", help="a grades Parquet file (local or URL)")
    to_catalog.add_argument("--out", required=True, help="labelled catalogue Parquet (ID, label, ra, dec)")
    to_catalog.set_defaults(handler=cmd_grades_to_catalog)
    _add_report_loop(_subparser(sub, "report-loop", common))

    demo = _subparser(sub, "demo", common)
    _add_flags(demo, DEMO_FLAGS)
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.set_defaults(handler=lambda args: cmd_demo(_demo_config(args), args.out))
    return parser


def _add_device(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES, help=f"where {what} (auto: CUDA when available)")


def _add_ensemble(parser: argparse.ArgumentParser, required_run: bool) -> None:
    """``--run`` (one network) or an ensemble: ``--runs A B C`` or ``--from-search EXP [--top K]``."""
    group = parser.add_mutually_exclusive_group(required=required_run)
    if required_run:
        group.add_argument("--run", help="checkpoint URL, or a run folder (its best checkpoint)")
    group.add_argument(
        "--runs",
        dest="members",
        nargs="+",
        metavar="RUN",
        help="an ensemble of these runs or checkpoints: the mean of their probabilities, score_std their spread",
    )
    group.add_argument(
        "--from-search", metavar="EXPERIMENT", help="an ensemble of the top --top trials of a `lensray tune` search"
    )
    parser.add_argument("--top", type=int, help="with --from-search: how many trials, best val_auc first (default 3)")


def _add_evaluate(evaluate: argparse.ArgumentParser) -> None:
    _add_flags(evaluate, EVALUATE_FLAGS)
    _add_ensemble(evaluate, required_run=True)
    evaluate.add_argument(
        "--out", required=True, help="folder (local path or s3://prefix) for report.html, metrics.json, PNGs"
    )
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    evaluate.add_argument("--tta", choices=("d4",), help="average the scores over the 8 rotations/flips")
    _add_device(evaluate, "the network runs")
    evaluate.add_argument("--prevalence", type=float, default=1e-4, help="lens fraction in a survey (default 1e-4)")
    evaluate.add_argument("--gallery", type=int, default=8, help="objects per gallery (default 8)")
    evaluate.set_defaults(handler=lambda args: cmd_evaluate(_resolve(args, EVALUATE_FLAGS), args))


def _add_compare(compare: argparse.ArgumentParser) -> None:
    compare.add_argument("runs", nargs="*", metavar="RUN", help="checkpoint URLs or run folders (best checkpoint)")
    _add_ensemble(compare, required_run=False)
    compare.add_argument(
        "--out", required=True, help="folder (local path or s3://prefix) for compare.md, compare.html, compare.json"
    )
    compare.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    compare.add_argument("--tta", choices=("d4",), help="average the scores over the 8 rotations/flips")
    compare.add_argument("--names", help="comma-separated row names (default: the run folders' names)")
    compare.add_argument("--store", help="evaluate every run on this store (default: each run's training store)")
    _add_device(compare, "the networks run")
    compare.set_defaults(handler=cmd_compare)


def _add_score(score: argparse.ArgumentParser) -> None:
    _add_flags(score, SCORE_FLAGS)
    _add_ensemble(score, required_run=True)
    score.add_argument(
        "--out", required=True, help="candidates Parquet URL (local or s3://); siblings: _rejects.csv, ..."
    )
    score.add_argument("--tta", choices=("d4",), help="average the scores over the 8 rotations/flips (kept per view)")
    score.add_argument(
        "--device", default="auto", choices=DEVICES, help="where the model replicas run (auto: GPUs when Ray has them)"
    )
    score.add_argument("--actors", type=int, help="model replicas (default: one per GPU, else one per CPU)")
    score.add_argument("--batch-size", type=int, default=64, help="cutouts per batch (default 64)")
    score.add_argument("--gallery", type=int, default=24, help="top candidates in the HTML gallery (default 24)")
    score.add_argument(
        "--part-size", type=int, help="IDs per streamed Parquet part (default: up to 1024, >= 4 parts per actor)"
    )
    score.add_argument(
        "--fresh", action="store_true", help="discard the finished parts of an earlier run under --out, start afresh"
    )
    score.set_defaults(handler=lambda args: cmd_score(_resolve(args, SCORE_FLAGS), args))


def _add_grade(grade: argparse.ArgumentParser) -> None:
    grade.add_argument("--candidates", required=True, help="candidates Parquet of `lensray score` (local or URL)")
    grade.add_argument("--out", required=True, help="grades Parquet (a local path; its journal lies beside it)")
    grade.add_argument("--images", help="root URL of the raw cutouts (default: those the candidates were scored from)")
    grade.add_argument("--bands", help="comma-separated bands to show (default: those scored, else VIS,Y,J,H)")
    grade.add_argument(
        "--order",
        default="score",
        choices=("score", "uncertainty", "mix"),
        help="score: best first (default); uncertainty: score_std largest first, else |score-0.5| smallest; "
        "mix: alternate",
    )
    grade.add_argument("--top", type=int, help="grade the first K of the order (default: all)")
    grade.add_argument(
        "--random-low", type=int, default=0, help="add N random candidates ranked below the top K, blind (purity)"
    )
    grade.add_argument("--seed", type=int, default=0, help="seed of the random slice (default 0)")
    grade.add_argument("--grader", help="your name in the grades file (default: the login name)")
    grade.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1, loopback)")
    grade.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    grade.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback --host (the page has no login)"
    )
    grade.add_argument("--open", action="store_true", help="open the page in the default browser")
    grade.set_defaults(handler=cmd_grade)


def _add_report_loop(report: argparse.ArgumentParser) -> None:
    report.add_argument("rounds", nargs="+", metavar="ROUND", help="round folders, oldest first (local or URLs)")
    report.add_argument("--out", required=True, help="folder for report.md, report.json, purity.png")
    report.add_argument("--top", type=int, default=100, help="N: purity in the top N (default 100)")
    report.add_argument("--truth", help="CSV or Parquet table of ID and is_lens (e.g. a simulation's truth.csv)")
    report.add_argument("--truth-column", default="is_lens", help="--truth's label column (default is_lens)")
    report.set_defaults(handler=cmd_report_loop)


def _add_export(export: argparse.ArgumentParser) -> None:
    export.add_argument(
        "run", metavar="RUN", help="run folder (its best checkpoint), checkpoint, or search (best trial)"
    )
    export.add_argument("--out", required=True, help="folder (local path or URL) for the exported model")
    export.add_argument(
        "--evaluation", help="a `lensray evaluate` folder of the same checkpoint: its AUC is recorded (test_auc)"
    )
    export.set_defaults(handler=cmd_export)


# -- logging and the one error path ----------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and notebooks replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


class _LineFormatter(logging.Formatter):
    """Progress as plain lines, warnings marked as such, and under -v the module that spoke."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return f"{record.name}: {message}" if record.levelno < logging.INFO else message


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(_LineFormatter())


def configure_logging(verbose: bool, quiet: bool) -> None:
    """The ``lensray`` logger: INFO by default, DEBUG under -v, WARNING under -q, one line per record on stderr."""
    logger = logging.getLogger("lensray")
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)


def reportable(exc: BaseException) -> BaseException | None:
    """The lensray error or missing-file error behind ``exc`` (through Ray's wrappers), or None for a bug."""
    return find_cause(exc, (LensrayError, *FILE_ERRORS))


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, LensrayError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    command = f"{args.command} {args.store_command}" if args.command == "store" else args.command
    try:
        check_buckets(_arg_urls(resolve_paths(args)))
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"lensray {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        cause = reportable(exc)
        if cause is None:
            raise  # a bug: the traceback is what helps
        if args.verbose:
            traceback.print_exception(exc)
        print(f"lensray {command}: {one_line(cause)}", file=sys.stderr)
        if isinstance(cause, Interrupted):
            return EXIT_INTERRUPTED
        return EXIT_USAGE if isinstance(cause, ConfigError) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
