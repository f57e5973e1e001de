"""One typed, validated configuration for every lensray job.

Each component owns a section (torchtitan style). Sections are frozen pydantic models that reject
unknown keys, so a typo in a YAML file or a ``key.sub=value`` override is an error naming the key,
never a silently ignored setting. The resolved config is dumped beside every output and reads back
identically.
"""

from __future__ import annotations

import os
import posixpath
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from lensray import storage
from lensray.errors import ConfigError
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile

LabelRule = Literal["paper", "official", "challenge"]
CatalogFormat = Literal["auto", "csv", "fits", "ecsv", "parquet"]
# Columns every candidates table has already: a kept catalogue column may not take one of these names.
CANDIDATE_COLUMNS: tuple[str, ...] = ("rank", "id", "score", "ra", "dec")
PreprocessMode = Literal["asinh", "log", "clip"]


class Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or a NaN is a typo that would only show as a diverged run hours later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads `epochs: true` as a bool, which pydantic would take as the number 1.
        field = cls.model_fields.get(info.field_name or "")
        items = value if isinstance(value, (list, tuple)) else [value]
        if field is not None and any(isinstance(v, bool) for v in items) and _numeric(field.annotation):
            raise ValueError("a boolean is not a number")
        return value


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is a number, or a number in a union or tuple (``int | None``, ``tuple[int, ...]``)."""
    if annotation in (int, float):
        return True
    return get_origin(annotation) in (Union, types.UnionType, tuple) and any(_numeric(a) for a in get_args(annotation))


class SimulateConfig(Section):
    """Challenge-format simulated data set (``lensray simulate``)."""

    out: str | None = None  # root URL of the data set (local path or s3://bucket/prefix)
    n: int = Field(200, ge=1)
    seed: int = 0
    first_id: int = Field(200001, ge=0)
    lens_fraction: float = Field(0.5, ge=0.0, le=1.0)
    workers: int | None = Field(None, ge=1)  # None: all CPUs Ray sees
    # Priors (lensray/simulate/priors.py): "randomised" wide nuisance priors for training, "shifted" other
    # priors for evaluation only, "classic" the original simulator (Gaussian PSF, one noise model).
    preset: Literal["randomised", "shifted", "classic"] = "randomised"
    companion_rate: float = Field(0.35, ge=0.0, le=1.0)  # classic only: galaxies with small companions (both classes)
    spiral_rate: float = Field(0.1, ge=0.0, le=1.0)  # classic only: non-lenses with arm/ring structure
    # The real data's quirks, at small rates.
    nan_pixel_rate: float = Field(0.02, ge=0.0, le=1.0)  # fraction of IDs with some NaN pixels
    offsize_nir_rate: float = Field(0.01, ge=0.0, le=1.0)  # fraction of IDs with a non-66x66 NIR stamp
    missing_image_rate: float = Field(0.01, ge=0.0, le=1.0)  # catalogue rows without images
    duplicate_id_rate: float = Field(0.01, ge=0.0, le=1.0)  # catalogue rows repeating an earlier ID


class StoreWeight(Section):
    """One of the stores trained on together (``data.stores``) and its share of the training samples."""

    url: str  # a preprocessed Zarr store (local path or s3://); a relative path: the folder the command ran in
    weight: float = Field(1.0, gt=0.0)  # relative: each training sample comes from this store with weight / sum

    @field_validator("url")
    @classmethod
    def _absolute(cls, url: str) -> str:
        if not url.strip():
            raise ValueError("a store URL cannot be empty")
        return storage.absolute_path(url)


class DataConfig(Section):
    """Where the raw cutouts live and in which survey layout, which catalogue columns to read, how they are labelled."""

    images: str | None = None  # root URL of the cutouts, laid out as `profile` says (challenge: EUC_VIS/, EUC_Y/, ...)
    # The survey's bands, grids and file layout (lensray/profiles.py): a shipped profile's name
    # (euclid_challenge, euclid_mer, hsc, lsst) or a full mapping for any other survey. Saved in full.
    profile: SurveyProfile = PROFILES[DEFAULT_PROFILE]
    catalog: str | None = None  # URL of the catalogue: CSV, FITS, ECSV or Parquet table
    store: str | None = None  # URL of a preprocessed Zarr store to train / evaluate on
    labels: LabelRule = "paper"  # the challenge catalogue's label rule (used when label_column is None)
    # Network channels, in the profile's order; None (the default): all of the profile's bands.
    bands: tuple[str, ...] = Field(None, validate_default=True)  # type: ignore[assignment]
    nan: Literal["zero", "reject"] = "zero"
    catalog_format: CatalogFormat = "auto"  # auto: from the extension (.fits/.fit/.fts, .ecsv, .parquet; else CSV)
    id_column: str = "ID"  # integer object IDs: the number in each cutout's file name
    # None: the challenge catalogue is labelled by `labels`, any other table is unlabelled (scoring only).
    # A column name: labels from it (1/0 or true/false, nothing else).
    label_column: str | None = None
    coord_columns: tuple[str, str] | None = None  # (ra, dec) columns in degrees, carried to candidates as ra, dec
    keep_columns: tuple[str, ...] = ()  # further catalogue columns carried to candidates under their own names
    # Training on several stores at once (instead of `store`, not with it): a list of {url, weight} (a bare
    # URL: weight 1). Each training sample comes from store k with probability weight_k / sum; validation
    # is reported per store. Evaluate and score use one store (`store`).
    stores: tuple[StoreWeight, ...] = ()

    @field_validator("stores", mode="before")
    @classmethod
    def _bare_urls(cls, stores: Any) -> Any:
        if isinstance(stores, (list, tuple)):
            return tuple({"url": s} if isinstance(s, str) else s for s in stores)
        return stores

    @field_validator("stores")
    @classmethod
    def _stores_distinct(cls, stores: tuple[StoreWeight, ...]) -> tuple[StoreWeight, ...]:
        urls = [s.url for s in stores]
        if len(set(urls)) != len(urls):
            raise ValueError(f"store repeated in {urls}")
        return stores

    @model_validator(mode="after")
    def _one_kind_of_store(self) -> DataConfig:
        if self.store is not None and self.stores:
            raise ValueError(f"give data.store ({self.store}) or data.stores, not both")
        return self

    def training_stores(self) -> tuple[StoreWeight, ...]:
        """The stores to train on with their weights: ``stores``, or ``store`` alone with weight 1."""
        if self.stores:
            return self.stores
        if self.store is None:
            raise ConfigError(
                "data.store (or data.stores) is required: the URL of a store written by `lensray preprocess`"
            )
        return (StoreWeight(url=self.store),)

    @field_validator("id_column", "label_column")
    @classmethod
    def _column_named(cls, name: str | None) -> str | None:
        if name is not None and not name.strip():
            raise ValueError("a column name cannot be empty")
        return name

    @field_validator("keep_columns")
    @classmethod
    def _keep_columns_distinct(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(names)) != len(names):
            raise ValueError(f"column repeated in {list(names)}")
        taken = [n for n in names if n in CANDIDATE_COLUMNS or re.fullmatch(r"score_d4_\d+", n)]
        if taken:
            raise ValueError(f"{taken} would overwrite candidate columns ({', '.join(CANDIDATE_COLUMNS)}, score_d4_k)")
        return names

    @field_validator("profile", mode="before")
    @classmethod
    def _shipped_profile(cls, profile: Any) -> Any:
        if isinstance(profile, str):
            if profile not in PROFILES:
                raise ValueError(
                    f"unknown survey profile {profile!r}; shipped: {', '.join(PROFILES)} (or give a mapping)"
                )
            return PROFILES[profile]
        return profile

    @field_validator("bands", mode="before")
    @classmethod
    def _bands_of_profile(cls, bands: Any, info: ValidationInfo) -> Any:
        profile = info.data.get("profile")
        if profile is None:  # the profile itself is invalid: that error alone is reported
            return () if bands is None else bands
        if bands is None:
            return profile.band_names
        bands = tuple(bands) if isinstance(bands, (list, tuple)) else bands
        if not isinstance(bands, tuple) or not all(isinstance(b, str) for b in bands):
            return bands  # pydantic reports the type
        if not bands:
            raise ValueError("at least one band is required")
        if len(set(bands)) != len(bands):
            raise ValueError(f"duplicate band in {list(bands)}")
        unknown = [b for b in bands if b not in profile.band_names]
        if unknown:
            raise ValueError(f"band(s) {unknown} not in profile {profile.name} ({', '.join(profile.band_names)})")
        return tuple(b for b in profile.band_names if b in bands)  # the profile's order


class PreprocessConfig(Section):
    """How raw cutouts become network inputs, and how the store is laid out."""

    mode: PreprocessMode = "asinh"
    upsample: Literal["bilinear", "bicubic"] = "bilinear"
    asinh_softening: float = Field(3.0, gt=0.0)  # arcsinh(x / softening), x in units of noise sigma
    border: int = Field(8, ge=1)  # outer border (px) used for the robust noise estimate
    crop: int | None = Field(None, ge=2)  # central crop (VIS pixels) before binning
    bin: int = Field(1, ge=1)  # integer binning after the crop
    dtype: Literal["float16", "float32"] = "float16"
    out: str | None = None  # store URL
    shard_size: int = Field(256, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    limit: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=1)
    strict: bool = False

    @model_validator(mode="after")
    def _geometry(self) -> PreprocessConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave a training split")
        # Without a crop the side is the profile's reference stamp, checked where the profile is known.
        if self.crop is not None and self.crop % self.bin:
            raise ValueError(f"bin={self.bin} does not divide the {self.crop}-px crop")
        return self


class LastroConfig(Section):
    """The LASTRO CNN (Schaefer et al. 2018 as used by the study): conv pairs, max-pool, dropout, dense."""

    filters: int = Field(16, ge=1)  # filters of the first conv pair; doubled for each later pair
    pairs: int = Field(3, ge=1)  # number of conv pairs (each followed by a max-pool)
    first_kernel: int = Field(5, ge=1)  # first conv of each pair
    kernel: int = Field(3, ge=1)  # second conv of each pair
    pool: int = Field(3, ge=1)  # max-pool width (and stride)
    # In conv blocks. Off by default: conv dropout stops the net from fitting (README "Training": the sanity check).
    dropout_kind: Literal["spatial", "standard", "none"] = "none"
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    dense: tuple[int, ...] = (128,)  # hidden dense widths before the 1-logit output
    dense_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    # "bn_relu": conv->BN->ReLU (learns); "paper": the study's conv->ReLU->conv->ReLU->BN order.
    block_order: Literal["bn_relu", "paper"] = "bn_relu"
    init: Literal["kaiming", "default"] = "kaiming"


class ResNetConfig(Section):
    """The Keras CIFAR-10 ResNet v1: 3 stages of ``blocks`` basic blocks (depth = 6*blocks + 2)."""

    blocks: int = Field(3, ge=1)  # per stage; 3 -> ResNet-20
    widths: tuple[int, int, int] = (16, 32, 64)
    kernel: int = Field(3, ge=1)
    pool: int = Field(8, ge=1)  # average-pool width before the dense layer
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # before the dense layer
    init: Literal["kaiming", "default"] = "kaiming"


class TwoBranchConfig(Section):
    """Two-branch VIS/NIR CNN: VIS at its own pixel scale, the NIR bands pooled back to their native
    (3x coarser) sampling, each through its own conv stack, merged late (challenge-2.0 winners' layout)."""

    filters: int = Field(32, ge=1)  # width of each branch's first block, doubled per block (16 fit too slowly)
    blocks: int = Field(3, ge=1)  # conv-BN-ReLU pairs per branch, each followed by a 2x2 max-pool
    nir_blocks: int | None = Field(2, ge=1)  # NIR branch depth (its maps start 3x smaller); None: blocks
    kernel: int = Field(3, ge=1)  # odd: "same" padding
    # Each branch's last map is average-pooled to pooled x pooled, then flattened: 3 keeps where the light
    # is (centre vs ring); a global average (1) could not fit 64 cutouts in the sanity check at Adam 3e-4.
    pooled: int = Field(3, ge=1)
    dense: int = Field(64, ge=1)  # hidden width after the merge
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # before the output layer (0.3 slowed the sanity fit)
    init: Literal["kaiming", "default"] = "kaiming"


class ViTConfig(Section):
    """A small vision transformer: patch-embedding conv, class token, learned positions, pre-norm
    ``nn.TransformerEncoder`` layers, a linear head on the class token."""

    patch: int = Field(10, ge=1)  # patch side in input pixels (50 px -> 5x5 tokens; 5 fit too slowly)
    width: int = Field(64, ge=8)  # token width; a multiple of heads
    depth: int = Field(4, ge=1)  # encoder layers
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(2.0, gt=0.0)  # feed-forward width = mlp_ratio * width
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # in the encoder layers and before the head (0.1 slowed fitting)

    @model_validator(mode="after")
    def _width_splits_into_heads(self) -> ViTConfig:
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not a multiple of heads={self.heads}")
        return self


class ModelConfig(Section):
    """Which network; each network reads only its own section."""

    name: Literal["resnet", "lastro", "twobranch", "vit"] = "lastro"
    lastro: LastroConfig = LastroConfig()
    resnet: ResNetConfig = ResNetConfig()
    twobranch: TwoBranchConfig = TwoBranchConfig()
    vit: ViTConfig = ViTConfig()


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    # ReduceLROnPlateau on val AUC: the study dropped 1e-3 -> 1e-4 -> 1e-5.
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0)
    plateau_patience: int = Field(3, ge=0)
    min_lr: float = Field(1e-6, ge=0.0)
    # "plateau": the above on val AUC; "cosine": cosine decay from lr to min_lr over train.epochs, per epoch.
    schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_epochs: int = Field(0, ge=0)  # cosine only: linear ramp to lr over these first epochs
    # Exponential moving average of the weights (per step), used for validation and saved as the
    # checkpoint's model; None: off. 0.999 averages over ~1000 steps.
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # global: split across workers
    steps_per_epoch: int | None = Field(None, ge=1)  # None: one pass over the training split
    balanced: bool = True  # half lenses in every batch
    augment: Literal["none", "flips", "d4"] = "d4"
    # Beyond D4, per sample at train time (0: off): a random sub-pixel shift of up to shift_px pixels
    # (bilinear, edges repeated), flux scaled by a factor in [1 - flux_jitter, 1 + flux_jitter] per
    # band, and added Gaussian noise of a std drawn in [0, noise_jitter] (input units) per sample.
    shift_px: float = Field(0.0, ge=0.0, le=4.0)
    flux_jitter: float = Field(0.0, ge=0.0, lt=1.0)
    noise_jitter: float = Field(0.0, ge=0.0)
    val_subset: int | None = Field(None, ge=2)  # fixed balanced validation subset; None: all of val
    early_stopping_patience: int | None = Field(5, ge=1)  # epochs without val AUC gain; None: off
    sanity: bool = True  # overfit a small fixed batch first and fail fast if the loss does not fall
    sanity_samples: int = Field(64, ge=2)  # one batch of 32 is too easy: the study's recipe overfits it
    sanity_steps: int = Field(60, ge=1)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # mixed precision on GPU; off on CPU
    feed: Literal["auto", "ram", "stream"] = "auto"  # load each worker's share into RAM when it fits
    seed: int = 0
    out: str | None = None  # storage path for runs and checkpoints (local or s3://)
    name: str | None = None  # run name under `out`
    num_to_keep: int = Field(2, ge=1)  # checkpoint folders kept: the latest plus the best by val AUC
    max_failures: int = Field(0, ge=-1)  # Ray Train restarts after a worker dies
    # Fine-tuning: start from the weights of a run folder (its best checkpoint) or a checkpoint folder (local
    # or s3://); the model config must build the same network and the store have the same bands. None: fresh.
    init_from: str | None = None
    # Keep the first N blocks of the network fixed (lensray/models/freeze.py says what a block is per network;
    # their batch norms stay in eval mode). 0: train everything.
    freeze: int = Field(0, ge=0)
    select_on: int = Field(0, ge=0)  # with data.stores: the store (position in the list) whose val AUC selects

    @field_validator("init_from")
    @classmethod
    def _absolute_source(cls, url: str | None) -> str | None:
        # Resolved on the driver: Ray workers run in folders of their own.
        return storage.absolute_path(url) if url is not None else None


class ResourcesConfig(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)


class SearchConfig(Section):
    """Ray Tune search (``lensray tune``): ASHA early stopping on ``metric`` per epoch."""

    num_samples: int = Field(1, ge=1)  # samples of the space (each grid point is repeated this often)
    metric: str = "val_auc"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(2, ge=1)  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = Field(3.0, gt=1.0)  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster's CPUs/GPUs fit
    name: str | None = None  # experiment name under `storage` (needed for --resume)
    storage: str | None = None  # experiment root (local path or s3://); None: train.out, else ./runs
    seed: int | None = None  # seeds the sampling of the space; None: fresh samples every search


class LensrayConfig(Section):
    simulate: SimulateConfig = SimulateConfig()
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    resources: ResourcesConfig = ResourcesConfig()
    search: SearchConfig = SearchConfig()

    @model_validator(mode="after")
    def _geometry_fits_profile(self) -> LensrayConfig:
        reference = self.data.profile.reference_band
        side = self.preprocess.crop if self.preprocess.crop is not None else reference.size
        if side > reference.size:
            raise ValueError(
                f"preprocess.crop={side} is larger than the {reference.size}-px {reference.name} stamp of profile {self.data.profile.name}"
            )
        if side % self.preprocess.bin:
            raise ValueError(f"preprocess.bin={self.preprocess.bin} does not divide the {side}-px image side")
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif not item["loc"]:  # a check across sections: its message names the keys; the input is the whole file
            lines.append(f"  {item['msg']}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_override(override: str) -> tuple[list[str], Any]:
    """``"train.epochs=5"`` -> (["train", "epochs"], 5); the value is read as a YAML scalar/list."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` entries in a nested dict (a copy). Validation happens afterwards."""
    result = _deep_copy(tree)
    for override in overrides:
        path, value = parse_override(override)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(path[: depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> LensrayConfig:
    try:
        return LensrayConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def parse_yaml(text: str | bytes, source: str) -> dict[str, Any]:
    """A config file's text as a mapping of sections; ConfigError naming ``source`` otherwise."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def read_yaml(url: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping, from a local path or any URL ``lensray.storage`` reads (s3://...)."""
    url = str(url)
    if not storage.is_local(url):
        return parse_yaml(storage.read_bytes(url), url)
    # A plain read: Ctrl-C interrupts it (a FIFO, a slow mount).
    return parse_yaml(Path(storage.strip_scheme(url)).read_bytes(), url)


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` on top of ``base``, section by section (a copy)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


# Every key that holds a path or URL. A relative local path means the folder the command was started
# in: resolved once, on the driver, since Ray workers and Tune trials run in folders of their own.
PATH_KEYS: tuple[str, ...] = (
    "simulate.out",
    "data.images",
    "data.catalog",
    "data.store",
    "preprocess.out",
    "train.out",
    "search.storage",
)
# One rule for what is a URL and what a local path: storage's (a scheme, ``file://`` too, makes a URL;
# ``file://`` URLs and plain paths are both this machine's files).
is_url = storage.is_url
absolute_path = storage.absolute_path


def relative_url(url: str, reference: str) -> str:
    """``reference`` as written inside the file at ``url`` (e.g. a tune file's ``base:``): a URL or an
    absolute path as is, a relative one against the folder of ``url`` (``s3://b/tune/t.yaml`` with
    ``../configs/c.yaml`` -> ``s3://b/configs/c.yaml``)."""
    if is_url(reference) or os.path.isabs(os.path.expanduser(reference)):
        return absolute_path(reference)
    if is_url(url):
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), reference))}"
    return os.path.normpath(os.path.join(os.path.dirname(absolute_path(url)), reference))


def absolute_paths(config: LensrayConfig) -> LensrayConfig:
    """``config`` with every local path in ``PATH_KEYS`` absolute (see ``absolute_path``)."""
    updates: dict[str, dict[str, str]] = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and absolute_path(value) != value:
            updates.setdefault(section, {})[name] = absolute_path(value)
    sections = {section: getattr(config, section).model_copy(update=update) for section, update in updates.items()}
    return config.model_copy(update=sections)


def config_from_tree(tree: dict[str, Any], source: str, overrides: list[str] | None = None) -> LensrayConfig:
    """Defaults <- ``tree`` (a config file's mapping) <- ``key.sub=value`` overrides, validated as a
    whole, with every local path absolute (``absolute_paths``)."""
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " + overrides"
    return absolute_paths(config_from_dict(tree, source))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LensrayConfig:
    """Defaults <- YAML file (local path or URL) <- ``key.sub=value`` overrides (``config_from_tree``)."""
    tree = read_yaml(path) if path is not None else {}
    return config_from_tree(tree, str(path) if path is not None else "defaults", overrides)


def dump_config(config: LensrayConfig) -> str:
    """YAML text of the fully resolved config; ``load_config`` of it gives an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: LensrayConfig, path: str | Path) -> None:
    Path(path).write_text(dump_config(config))
