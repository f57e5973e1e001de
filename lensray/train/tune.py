"""Ray Tune: a search space in plain YAML over any training key, ASHA on the validation metric.

A tune file names a run config and a space of distributions over dotted config keys::

    base: ../configs/lastro.yaml          # a run config, relative to this file (or an inline `run:`)
    run: {train: {epochs: 6}}             # overrides on top of base
    space:
      model.lastro.first_kernel: {choice: [3, 5, 7]}
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    search: {num_samples: 8, metric: val_auc, mode: max, grace_period: 2, reduction_factor: 3}

Distributions: ``choice: [values]``, ``grid: [values]`` (every value, ``num_samples`` times each),
``uniform: [low, high]``, ``loguniform: [low, high]`` (low > 0), ``randint: [low, high]`` (integers,
both ends included). Everything is checked at load: each key must name a config field that a trial
can vary, and every value a sample can produce (each choice, both ends and the middle of a range)
must give a valid run config, so a search never dies hours in on a typo.

Each trial is a *function* trainable that builds ``lensray.train.trainer.build_trainer``'s TorchTrainer with
a ``TuneReportCallback`` (``Tuner(TorchTrainer)`` fails in Ray 2.60). The trial's Train run lives in
the trial's folder, so ``<storage>/<name>/`` holds everything::

    <name>/tune_config.yaml                 the resolved search (what --resume reruns)
    <name>/best_config.yaml                 the best trial's run config, for `lensray train --config`
    <name>/asha_stopped.json                trials ASHA stopped before the last epoch
    <name>/trial_<id>/train/checkpoint_*/   the Train run: checkpoints, history.json, tensorboard/

``tensorboard --logdir <storage>/<name>`` shows every trial's curves side by side.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from lensray import storage
from lensray.config import (
    ConfigError,
    LensrayConfig,
    SearchConfig,
    Section,
    absolute_paths,
    apply_overrides,
    config_from_dict,
    dump_config,
    merge_trees,
    read_yaml,
    relative_url,
)
from lensray.errors import SearchError
from lensray.runs import (
    ASHA_STOPS_FILE,
    METRICS,
    TRIAL_DONE_FILE,
    TRIAL_RUN,
    ExperimentSummary,
    read_asha_stops,
    summarise_experiment,
)
from lensray.runtime import ensure_ray, verbose

log = logging.getLogger(__name__)
TUNE_CONFIG_FILE = "tune_config.yaml"
BEST_CONFIG_FILE = "best_config.yaml"
TRIAL_CPU = 0.01  # the trial function only waits on its TorchTrainer; the workers hold the CPUs
TOP_LEVEL_KEYS = ("base", "run", "space", "search")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
# Keys a trial cannot vary: the store is already preprocessed, resources are fixed per search (they
# decide how many trials run at once), and where a trial writes is decided by the search.
FIXED_SECTIONS = ("simulate", "preprocess", "search", "resources")
FIXED_KEYS = ("data.images", "data.catalog", "data.labels", "data.bands", "data.nan", "train.out", "train.name")


# --- the search space ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` is a name from DISTRIBUTIONS, ``values`` its list or its [low, high]."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def to_tune(self) -> Any:
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        low, high = self.values
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive; ours is included

    def reachable_values(self) -> list[Any]:
        """Values a sample can take that must all make a valid config: every listed value, or the
        ends of a range and its middle (the middle catches a float range on an integer key)."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        low, high = self.values
        if self.kind == "randint":
            return [low, high]
        middle = math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2
        return [low, middle, high]

    def as_yaml(self) -> dict[str, list[Any]]:
        return {self.kind: list(self.values)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_dimension(key: str, spec: Any, where: str) -> Dimension:
    """``{choice: [...]}``, ``{uniform: [low, high]}``, ... -> Dimension; ConfigError naming the key."""
    name = f"{where}: space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{name}: must be a mapping with one distribution, e.g. {{choice: [3, 5]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{name}: unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(values, list):
        raise ConfigError(f"{name}: {kind} takes a list, got {values!r}")
    if kind in ("choice", "grid"):
        if not values:
            raise ConfigError(f"{name}: {kind} needs at least one value")
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(_is_number(v) for v in values):
        hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if any(isinstance(v, str) for v in values) else ""
        raise ConfigError(f"{name}: {kind} takes [low, high] as two numbers, got {values!r}{hint}")
    low, high = values
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{name}: randint takes two integers, got {values!r}")
    if low >= high:
        raise ConfigError(f"{name}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{name}: loguniform needs low > 0, got {low}")
    return Dimension(key, kind, (low, high))


def _check_key(key: str, where: str) -> None:
    """The dotted key must name a field of LensrayConfig that a trial may vary."""
    node: type[Section] = LensrayConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = node.model_fields
        if part not in fields:
            known = ", ".join(fields)
            raise ConfigError(
                f"{where}: space.{key}: {'.'.join(parts[: depth + 1])} is not a config key (known here: {known})"
            )
        annotation = fields[part].annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, Section)):
                raise ConfigError(f"{where}: space.{key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
            node = annotation
    if parts[0] in FIXED_SECTIONS or key in FIXED_KEYS or any(key.startswith(k + ".") for k in FIXED_KEYS):
        why = (
            "the search decides where trials write"
            if key.startswith("train.")
            else "resources are fixed per search"
            if key.startswith("resources")
            else "a trial trains on the preprocessed data.store (search over data.store to compare stores)"
        )
        raise ConfigError(f"{where}: space.{key}: cannot be searched: {why}")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = tree
    for part in sections:
        node = node.setdefault(part, {})
    node[leaf] = value


@dataclass(frozen=True)
class TuneSpec:
    """A validated search: the run config every trial starts from, and the searched keys."""

    source: str
    run: LensrayConfig
    space: dict[str, Dimension]

    @property
    def search(self) -> SearchConfig:
        return self.run.search

    @property
    def max_epochs(self) -> int:
        epochs = self.space.get("train.epochs")
        return int(max(epochs.reachable_values())) if epochs is not None else self.run.train.epochs

    def param_space(self) -> dict[str, Any]:
        return {key: dimension.to_tune() for key, dimension in self.space.items()}

    def trial_config(self, params: dict[str, Any], **train: Any) -> LensrayConfig:
        """The run config of one sample of the space (``train`` sets train.* keys, e.g. out and name)."""
        tree = self.run.model_dump(mode="json")
        for key, value in params.items():
            _set_dotted(tree, key, value)
        for key, value in train.items():
            tree["train"][key] = value
        return config_from_dict(tree, f"{self.source} with {params}")

    def experiment_url(self) -> str:
        root = self.search.storage or self.run.train.out or str(Path("runs").resolve())
        if self.search.name is None:
            raise SearchError("search.name is required here (--name)")
        return storage.join(root, self.search.name)

    def dump(self) -> str:
        """YAML that ``load_tune_config`` reads back into an equal spec (the run inline, no base)."""
        run = self.run.model_dump(mode="json")
        search = run.pop("search")
        return yaml.safe_dump(
            {"run": run, "space": {k: d.as_yaml() for k, d in self.space.items()}, "search": search}, sort_keys=False
        )


def tune_spec_from_dict(
    tree: dict[str, Any], source: str, base_dir: Path | None = None, overrides: list[str] | None = None
) -> TuneSpec:
    """Validate a tune file's mapping (``base`` paths are relative to ``base_dir``)."""
    unknown = sorted(set(tree) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown} (known: {', '.join(TOP_LEVEL_KEYS)})")
    run = _run_config(tree, source, base_dir, overrides)
    space_tree = tree.get("space")
    if not isinstance(space_tree, dict) or not space_tree:
        raise ConfigError(f"{source}: space must map at least one config key to a distribution")
    space = {}
    for key, spec in space_tree.items():
        _check_key(str(key), source)
        space[str(key)] = _reachable(parse_dimension(str(key), spec, source), run, source)
    return TuneSpec(source=source, run=run, space=space)


def _run_config(tree: dict[str, Any], source: str, base_dir: Path | None, overrides: list[str] | None) -> LensrayConfig:
    """The run config every trial starts from: ``base``, then ``run`` and ``search`` on top, then
    ``overrides``; local paths made absolute (trials run in their own folders)."""
    run_tree: dict[str, Any] = {}
    if tree.get("base") is not None:
        base = Path(base_dir or ".") / str(tree["base"])
        if not base.is_file():
            raise ConfigError(f"{source}: base: no run config at {base}")
        run_tree = read_yaml(base)
    for section in ("run", "search"):
        if not isinstance(tree.get(section) or {}, dict):
            raise ConfigError(f"{source}: {section} must be a mapping, got {tree[section]!r}")
    run_tree = merge_trees(run_tree, tree.get("run") or {})
    run_tree = merge_trees(run_tree, {"search": tree.get("search") or {}})
    if overrides:
        run_tree = apply_overrides(run_tree, overrides)
    run = config_from_dict(run_tree, source)
    if run.search.metric not in METRICS:
        raise ConfigError(
            f"{source}: search.metric {run.search.metric!r} is not reported by training (one of {', '.join(METRICS)})"
        )
    return absolute_paths(run)


def _reachable(dimension: Dimension, run: LensrayConfig, source: str) -> Dimension:
    """``dimension``, once every value a sample can take gives a valid run config (else ConfigError)."""
    base_tree = run.model_dump(mode="json")
    for value in dimension.reachable_values():
        _set_dotted(base_tree, dimension.key, value)
        try:
            config_from_dict(base_tree, source)
        except ConfigError as exc:
            reason = str(exc).splitlines()[-1].strip()
            raise ConfigError(
                f"{source}: space.{dimension.key}: a sample of {value!r} gives an invalid run config: {reason}"
            ) from None
    return dimension


def load_tune_config(url: str | Path, overrides: list[str] | None = None) -> TuneSpec:
    """Read and validate a tune file from a local path or any URL storage reads; its relative ``base:``
    resolves against the tune file's own URL. ``overrides`` (``key.sub=value``) apply to its run config,
    e.g. ``search.num_samples=4`` or ``data.store=s3://bucket/store.zarr``."""
    url = str(url)
    try:
        tree = read_yaml(url)
    except FileNotFoundError:
        raise ConfigError(f"no tune config at {url}") from None
    base, run = tree.get("base"), tree.get("run") or {}
    if base is not None and isinstance(run, dict):  # else tune_spec_from_dict names the wrong key
        base_url = relative_url(url, str(base))
        try:
            base_tree = read_yaml(base_url)
        except FileNotFoundError:
            raise ConfigError(f"{url}: base: no run config at {base_url}") from None
        tree = {**tree, "base": None, "run": merge_trees(base_tree, run)}
    return tune_spec_from_dict(tree, url, None, overrides)


# --- one trial ----------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], *, spec_yaml: str, experiment: str) -> None:
    """The function trainable: one Train run with the sampled ``params``, in the trial's folder."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lensray.train.trainer import CONFIG_FILE, build_trainer

    spec = tune_spec_from_dict(yaml.safe_load(spec_yaml), "tune trial")
    context = ray.tune.get_context()
    trial_url = storage.join(experiment, os.path.basename(context.get_trial_dir()))
    config = spec.trial_config(params, out=trial_url, name=TRIAL_RUN)
    storage.write_bytes(storage.join(trial_url, TRIAL_RUN, CONFIG_FILE), dump_config(config).encode())
    # A restarted trial (--resume) finds its Train run's checkpoints by name and continues from them.
    build_trainer(config, TRIAL_RUN, run_callbacks=[TuneReportCallback()]).fit()
    # How a reader of the folder (runs.summarise_experiment) tells a finished trial from an interrupted one.
    storage.write_bytes(
        storage.join(trial_url, TRIAL_DONE_FILE), json.dumps({"trial_id": context.get_trial_id()}).encode()
    )


def trial_folder_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


class RecordingASHA(AsyncHyperBandScheduler):
    """ASHA that writes which trials it stopped before their last epoch into the experiment folder,
    so a summary, also of a resumed search, can tell them from trials that ended on their own."""

    def __init__(self, *, stops_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stops_url = stops_url

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(self._time_attr)
        if action == TrialScheduler.STOP and epoch is not None and epoch < self._max_t:
            stops = read_asha_stops(self._stops_url)
            stops[trial.trial_id] = {"epoch": epoch, self._metric: result.get(self._metric)}
            storage.write_bytes(self._stops_url, json.dumps(stops, indent=1).encode())
            log.info(
                f"ASHA stops trial {trial.trial_id} at epoch {epoch}: {self._metric} {_number(result.get(self._metric))}"
            )
        return action


class TrialLines(Callback):
    """The console of a search: a line per trial result and per finished or failed trial on the
    ``lensray`` logger (INFO), in place of Tune's status tables, which only -v shows."""

    def __init__(self, metric: str, mode: str, max_epochs: int) -> None:
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        log.info(
            f"trial {trial.trial_id} ({_params(trial.config)}) epoch {result.get('epoch')}/{self.max_epochs}: "
            f"{self.metric} {_number(result.get(self.metric))}, train loss {_number(result.get('train_loss'))}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        best = (trial.metric_analysis or {}).get(self.metric, {}).get(self.mode)
        epochs = (trial.last_result or {}).get("epoch")
        log.info(f"trial {trial.trial_id} done after epoch {epochs}: best {self.metric} {_number(best)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        log.warning(f"trial {trial.trial_id} ({_params(trial.config)}) failed; its error is in the summary")


def _params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items()
    )


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


# --- the search ---------------------------------------------------------------------------------


def check_models(spec: TuneSpec, store: Any) -> None:
    """Build the network for every reachable value of every searched key on the store's image size,
    so a pool too wide or a net too deep for the images fails now, naming the key, not in trial 17."""
    from lensray.models import build_model, tunable_prefixes

    channels, size = store.sample_shape[0], store.sample_shape[1]
    for dimension in spec.space.values():
        network = next((name for prefix, name in tunable_prefixes().items() if dimension.key.startswith(prefix)), None)
        for value in dimension.reachable_values():
            # A key of one network's section is checked on that network, whatever the base config builds.
            config = spec.trial_config({dimension.key: value, **({"model.name": network} if network else {})})
            try:
                build_model(config.model, channels, size)
            except ValueError as exc:
                raise SearchError(
                    f"{spec.source}: space.{dimension.key}={value!r} on {channels}x{size}x{size} "
                    f"images of {store.url}: {exc}"
                ) from None


def _concurrency(spec: TuneSpec) -> int:
    """Trials that fit the cluster at once (each waits for all its workers), capped by the config."""
    import ray

    resources = ray.cluster_resources()
    per_trial_cpu = spec.run.resources.num_workers * spec.run.resources.cpus_per_worker + TRIAL_CPU
    fits = int(resources.get("CPU", 0) // per_trial_cpu)
    if spec.run.resources.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // spec.run.resources.num_workers))
    if fits < 1:
        raise SearchError(
            f"one trial needs {per_trial_cpu:g} CPUs"
            + (f" and {spec.run.resources.num_workers} GPUs" if spec.run.resources.use_gpu else "")
            + f"; the cluster has {resources}"
        )
    return min(fits, spec.search.max_concurrent_trials or fits)


def _storage_args(experiment: str) -> tuple[str, Any]:
    """(storage path, pyarrow filesystem or None) of the experiment's parent folder, for Ray."""
    root = experiment.rsplit("/", 1)[0]
    filesystem = None if storage.is_local(root) else storage.retrying_filesystem(root)
    return storage.strip_scheme(root), filesystem


def _progress_reporter(spec: TuneSpec) -> Any:
    from ray.tune import CLIReporter

    columns = {"epoch": "epoch", **{m: m for m in ("val_auc", "val_acc", "val_loss", "train_loss")}}
    columns.setdefault(spec.search.metric, spec.search.metric)
    return CLIReporter(
        metric_columns=columns,
        parameter_columns=list(spec.space),
        metric=spec.search.metric,
        mode=spec.search.mode,
        sort_by_metric=True,
        max_report_frequency=15,
    )


def run_tune(spec: TuneSpec, *, resume: bool = False, callbacks: list[Any] | None = None) -> SearchOutcome:
    """Run the search (or, with ``resume``, continue the interrupted one of the same name).

    ``callbacks`` are extra Tune callbacks (e.g. to watch or interrupt a search)."""
    from lensray.train.finetune import check_training

    spec = _named(spec, resume)
    experiment = spec.experiment_url()
    spec = _check_experiment(spec, experiment, resume)
    if spec.run.data.store is None and not spec.run.data.stores:
        raise SearchError("data.store is required: the URL of a store written by `lensray preprocess` (--store)")
    # Fail fast: a wrong URL, an unfinished store, stores that do not go together, a source network
    # (train.init_from) or train.freeze the base config does not fit, a net too deep.
    check_models(spec, check_training(spec.run)[0])
    ensure_ray()
    # The legacy reporter is the one that takes metric columns (the new one shows the first four keys).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = time.perf_counter()
    _tuner(spec, experiment, resume, callbacks).fit()
    return _outcome(spec, experiment, time.perf_counter() - started, resume)


def _named(spec: TuneSpec, resume: bool) -> TuneSpec:
    """``spec`` with a search name: its own, or a timestamp for a new search."""
    if spec.search.name is not None:
        return spec
    if resume:
        raise SearchError("--resume needs the search's name (search.name / --name)")
    name = f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    return TuneSpec(
        spec.source, spec.run.model_copy(update={"search": spec.search.model_copy(update={"name": name})}), spec.space
    )


def _check_experiment(spec: TuneSpec, experiment: str, resume: bool) -> TuneSpec:
    """Refuse a new search over an existing one, or a resume of nothing; on resume, the saved spec."""
    from ray.tune import Tuner

    filesystem = _storage_args(experiment)[1]
    exists = Tuner.can_restore(storage.strip_scheme(experiment), storage_filesystem=filesystem)
    if exists and not resume:
        raise SearchError(f"{experiment} already exists: pass --resume to continue it, or choose another --name")
    if not resume:
        return spec
    if not exists:
        raise SearchError(f"nothing to resume at {experiment}")
    # The trials were sampled from the saved spec: resume with it, whatever the file says now.
    saved = storage.join(experiment, TUNE_CONFIG_FILE)
    return tune_spec_from_dict(yaml.safe_load(storage.read_bytes(saved)), saved)


def _tuner(spec: TuneSpec, experiment: str, resume: bool, callbacks: list[Any] | None) -> Any:
    """Tune's Tuner for the search: restored from the experiment folder, or a new one (whose spec is
    saved first). A restored search keeps its first run's callbacks and console settings."""
    from ray.tune import RunConfig, TuneConfig, Tuner
    from ray.tune.search.basic_variant import BasicVariantGenerator

    storage_path, filesystem = _storage_args(experiment)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_yaml=spec.dump(), experiment=experiment), {"cpu": TRIAL_CPU}
    )
    if resume:
        path = storage.strip_scheme(experiment)
        return Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=filesystem)
    storage.write_bytes(storage.join(experiment, TUNE_CONFIG_FILE), spec.dump().encode())
    chatty = verbose()  # Tune's status tables only under -v; else TrialLines' lines
    return Tuner(
        trainable,
        param_space=spec.param_space(),
        # The variant generator takes the concurrency cap itself (TuneConfig's is ignored with it).
        tune_config=TuneConfig(
            num_samples=spec.search.num_samples,
            scheduler=_scheduler(spec, experiment),
            search_alg=BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=_concurrency(spec)),
            trial_dirname_creator=trial_folder_name,
        ),
        run_config=RunConfig(
            name=spec.search.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            progress_reporter=_progress_reporter(spec) if chatty else None,
            verbose=1 if chatty else 0,
            callbacks=[*(callbacks or []), TrialLines(spec.search.metric, spec.search.mode, spec.max_epochs)],
        ),
    )


def _scheduler(spec: TuneSpec, experiment: str) -> RecordingASHA:
    return RecordingASHA(
        stops_url=storage.join(experiment, ASHA_STOPS_FILE),
        time_attr="epoch",
        metric=spec.search.metric,
        mode=spec.search.mode,
        max_t=spec.max_epochs,
        grace_period=min(spec.search.grace_period, spec.max_epochs),
        reduction_factor=spec.search.reduction_factor,
        # A trial at its last epoch ends by itself: stopping it there would kill its Train controller
        # before it frees its placement group.
        stop_last_trials=False,
    )


def _outcome(spec: TuneSpec, experiment: str, wall_s: float, resumed: bool) -> SearchOutcome:
    """The finished (or interrupted) search read back from storage; its best config saved beside it."""
    summary = summarise_experiment(experiment, spec.search.metric, spec.search.mode)
    best_config = None
    if summary.best is not None:
        best_config = spec.trial_config(summary.best["params"])
        storage.write_bytes(storage.join(experiment, BEST_CONFIG_FILE), dump_config(best_config).encode())
    elif not summary.unfinished:
        errors = summary.table["error"].dropna() if len(summary.table) else pd.Series(dtype=object)
        raise SearchError(
            f"no trial of {experiment} reported {spec.search.metric}"
            + (f"; first error:\n{errors.iloc[0]}" if len(errors) else "")
        )
    return SearchOutcome(
        experiment_url=experiment, wall_s=wall_s, summary=summary, best_config=best_config, resumed=resumed
    )


def run_search(
    config_path: str | Path,
    *,
    storage: str | None = None,
    store: str | None = None,
    num_samples: int | None = None,
    name: str | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
    callbacks: list[Any] | None = None,
) -> SearchOutcome:
    """Load a tune file, apply the common overrides, and run (or resume) the search."""
    flags = {"search.storage": storage, "data.store": store, "search.num_samples": num_samples, "search.name": name}
    settings = [*(overrides or []), *(f"{key}={value}" for key, value in flags.items() if value is not None)]
    return run_tune(load_tune_config(config_path, settings), resume=resume, callbacks=callbacks)


# --- reading an experiment (no cluster needed) --------------------------------------------------


# --- the outcome --------------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    experiment_url: str
    wall_s: float
    summary: ExperimentSummary
    best_config: LensrayConfig | None
    resumed: bool = False

    @property
    def trials(self) -> int:
        return len(self.summary.table)

    @property
    def stopped_early(self) -> int:
        return self.summary.stopped_early

    @property
    def start_overheads_s(self) -> list[float]:
        table = self.summary.table
        return [float(v) for v in table.get("start_overhead_s", pd.Series(dtype=float)).dropna()]

    def __str__(self) -> str:
        summary, metric = self.summary, self.summary.metric
        errors = int(summary.table["error"].notna().sum()) if self.trials else 0
        lines = [
            f"search {self.experiment_url}: {self.trials} trials in {self.wall_s:.0f} s"
            f"{' (resumed)' if self.resumed else ''}; {self.stopped_early} stopped early by ASHA, {errors} failed"
        ]
        overheads = self.start_overheads_s
        if overheads:
            lines.append(
                f"  per-trial start overhead (trial start -> first epoch begins): median {statistics.median(overheads):.1f} s, "
                f"range {min(overheads):.1f}-{max(overheads):.1f} s"
            )
        if summary.unfinished:
            lines.append(f"  interrupted: {summary.unfinished} trials unfinished; continue with --resume")
        if self.trials:
            columns = [
                "trial_id",
                "status",
                *[c for c in summary.table.columns if "." in c],
                "epochs",
                f"best_{metric}",
                "best_epoch",
                "stopped_by_asha",
            ]
            lines.append("  " + summary.table[columns].to_string(index=False).replace("\n", "\n  "))
        if summary.best is not None:
            lines.append(
                f"  best: trial {summary.best['trial_id']} {metric} {summary.best['value']:.4f} at epoch "
                f"{summary.best['best_epoch']} -> {storage.join(self.experiment_url, BEST_CONFIG_FILE)}"
            )
        return "\n".join(lines)
