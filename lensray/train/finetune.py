"""Fine-tuning (``train.init_from``, ``train.freeze``) and training on several stores (``data.stores``):
the checks the driver makes before Ray starts, and what each worker does to its freshly built network.

A source is a run folder (its best checkpoint, ``runs.resolve_checkpoint``) or one checkpoint folder,
local or s3://; its weights are read with ``weights_only=True`` (``runs.read_state``), never unpickled.
The configured network must be the source's (same ``model.name``, every parameter of the same shape)
and the store's bands the source's, else a ConfigError naming the source and the first difference.
No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lensray import storage
from lensray.config import LensrayConfig
from lensray.errors import CheckpointError, ConfigError
from lensray.ingest.store import LensStore
from lensray.models import build_model, input_pixel_scale
from lensray.models.freeze import Frozen, freeze, frozen_prefixes
from lensray.runs import MODEL_INPUT_FILE, STATE_FILE, checkpoint_config, read_json, read_state, resolve_checkpoint
from lensray.train.feed import labelled_rows

# What stores trained on together must share beyond bands, sample shape and dtype: the transform's
# stretch and geometry (the recorded ``transform`` of ``lensray preprocess``).
SHARED_TRANSFORM_KEYS = ("mode", "asinh_softening", "crop", "bin", "output_shape")


def build_for(config: LensrayConfig, store: LensStore) -> torch.nn.Module:
    """The configured network for the store's inputs (bands, side, pixel scale after its binning)."""
    scale = input_pixel_scale(store.meta.get("transform"))
    return build_model(config.model, store.sample_shape[0], store.sample_shape[1], scale)


def open_stores(config: LensrayConfig) -> list[LensStore]:
    """The training stores (``data.store`` or ``data.stores``), opened; ConfigError when neither is set."""
    return [LensStore.open(entry.url) for entry in config.data.training_stores()]


def store_differences(first: LensStore, other: LensStore) -> list[str]:
    """What keeps two stores from being trained on together, one ``key: A vs B`` per difference."""
    pairs = {
        "bands": (first.meta.get("bands"), other.meta.get("bands")),
        "sample_shape": (list(first.sample_shape), list(other.sample_shape)),
        "dtype": (str(first.dtype), str(other.dtype)),
    }
    first_transform, other_transform = first.meta.get("transform") or {}, other.meta.get("transform") or {}
    for key in SHARED_TRANSFORM_KEYS:
        pairs[f"transform.{key}"] = (first_transform.get(key), other_transform.get(key))
    return [f"{key}: {a!r} vs {b!r}" for key, (a, b) in pairs.items() if a != b]


def check_stores(stores: list[LensStore], select_on: int) -> None:
    """Stores trained on together share bands, geometry and dtype; ``train.select_on`` names one of them."""
    for other in stores[1:]:
        differences = store_differences(stores[0], other)
        if differences:
            raise ConfigError(
                f"data.stores: {stores[0].url} and {other.url} cannot be trained on together: {'; '.join(differences)}"
            )
    if select_on >= len(stores):
        raise ConfigError(
            f"train.select_on={select_on}: there are {len(stores)} training store(s) (positions 0..{len(stores) - 1})"
        )


@dataclass(frozen=True)
class Source:
    """The network a fine-tune starts from."""

    url: str  # train.init_from as given
    checkpoint: str  # the checkpoint folder it resolved to
    model_name: str
    weights: dict[str, Any]
    bands: list[str] | None


def read_source(url: str) -> Source:
    """The weights, network name and bands of ``train.init_from`` (a run folder or a checkpoint folder)."""
    try:
        checkpoint = resolve_checkpoint(url)
        config = checkpoint_config(checkpoint)
        state = read_state(storage.join(checkpoint, STATE_FILE))
        record = read_json(storage.join(checkpoint, MODEL_INPUT_FILE), dict)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ConfigError(f"train.init_from={url}: {exc}") from None
    bands = record.get("bands")
    return Source(url, checkpoint, config.model.name, state["model"], list(bands) if bands else None)


def load_source(model: torch.nn.Module, source: Source, config: LensrayConfig, store: LensStore) -> None:
    """``source``'s weights into the bare, freshly built ``model``; ConfigError naming the source and the
    first difference when the network or the store's bands are not the source's."""
    if source.model_name != config.model.name:
        raise ConfigError(
            f"train.init_from={source.url}: the source is a {source.model_name} network, model.name is {config.model.name}"
        )
    bands = store.meta.get("bands")
    if source.bands is not None and list(bands or []) != source.bands:
        raise ConfigError(
            f"train.init_from={source.url}: the source was trained on bands {source.bands}, "
            f"store {store.url} has bands {bands}"
        )
    target = model.state_dict()
    for name in [*target, *(k for k in source.weights if k not in target)]:
        if name not in source.weights or name not in target:
            where = "the source" if name not in source.weights else "the configured network"
            raise ConfigError(f"train.init_from={source.url}: parameter {name} is missing from {where}")
        wanted, given = tuple(target[name].shape), tuple(source.weights[name].shape)
        if wanted != given:
            raise ConfigError(
                f"train.init_from={source.url}: parameter {name} has shape {given} in the source vs {wanted} in "
                f"the network model.{config.model.name} builds (the model config must match the source's)"
            )
    model.load_state_dict(source.weights)


def prepare_weights(model: torch.nn.Module, config: LensrayConfig, store: LensStore, *, fresh: bool) -> Frozen:
    """A worker's bare model before its optimiser exists: the source's weights on a ``fresh`` run with
    ``train.init_from`` (a resumed run loads its own checkpoint instead), then ``train.freeze``."""
    if fresh and config.train.init_from is not None:
        load_source(model, read_source(config.train.init_from), config, store)
    return freeze(model, config.train.freeze)


def check_training(config: LensrayConfig) -> list[LensStore]:
    """On the driver, before Ray starts: every training store opens and has labelled train and val rows,
    they can be trained on together, and the network fits ``train.init_from`` and ``train.freeze``."""
    stores = open_stores(config)
    for store in stores:
        for split in ("train", "val"):  # an unlabelled store is refused before Ray Train starts
            labelled_rows(store, split)
    check_stores(stores, config.train.select_on)
    if config.train.init_from is not None or config.train.freeze:
        model = build_for(config, stores[0])
        if config.train.init_from is not None:
            load_source(model, read_source(config.train.init_from), config, stores[0])
        frozen_prefixes(model, config.train.freeze)
    return stores
