"""The networks, in one registry: each is registered once with its builder, its description and its
config section (whose fields are its tunable options, ``model.<name>.<field>`` in a tune file).

Every model maps (N, in_channels, image_size, image_size) images to one lens logit per image, shape
(N,) (apply a sigmoid for a probability; train with ``BCEWithLogitsLoss``). Builders also get the input
``pixel_scale`` (arcsec per pixel: the reference band's scale times the store's binning; an
``InputScale`` that also carries each channel's native pixel scale), which the two-branch network needs
to tell the reference-scale channels from the coarser ones and pool those back to their native sampling. Adding a network touches its own
file, this registry and its config section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lensray.config import ModelConfig
from lensray.models.lastro import Lastro, build_lastro, describe_lastro, lastro_recipe
from lensray.models.resnet import ResNet, build_resnet, describe_resnet, resnet_recipe
from lensray.models.twobranch import InputScale, TwoBranch, build_twobranch, describe_twobranch, twobranch_recipe
from lensray.models.vit import ViT, build_vit, describe_vit, vit_recipe
from lensray.profiles import DEFAULT_PROFILE
from lensray.sky.bands import VIS_PIXEL_SCALE

ModelBuilder = Callable[..., nn.Module]  # (section, in_channels, image_size[, pixel_scale]) -> nn.Module


@dataclass(frozen=True)
class ModelSpec:
    """One registered network. ``section`` is the field of ``ModelConfig`` holding its options."""

    name: str
    build: ModelBuilder  # (section, in_channels, image_size, pixel_scale=VIS scale) -> nn.Module
    describe: Callable[[Any], str]  # section -> a short name, e.g. "ResNet-20"
    recipe: Callable[[Any], list[str]]  # section -> the choices that matter in a comparison
    summary: str  # one line for help texts and docs

    @property
    def section(self) -> str:
        return self.name


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("lastro", build_lastro, describe_lastro, lastro_recipe, "the LASTRO CNN (Schaefer et al. 2018)"),
        ModelSpec("resnet", build_resnet, describe_resnet, resnet_recipe, "a Keras-CIFAR-style ResNet (6n+2 layers)"),
        ModelSpec(
            "twobranch",
            build_twobranch,
            describe_twobranch,
            twobranch_recipe,
            "a two-branch CNN: VIS at full resolution, NIR at its native sampling, merged late",
        ),
        ModelSpec("vit", build_vit, describe_vit, vit_recipe, "a small vision transformer (patch tokens, class token)"),
    )
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return MODELS[name]


def model_section(config: ModelConfig) -> Any:
    """The options of the network ``config.name`` (its own section of the model config)."""
    return getattr(config, model_spec(config.name).section)


def build_model(
    config: ModelConfig, in_channels: int, image_size: int, pixel_scale: float = VIS_PIXEL_SCALE
) -> nn.Module:
    """The network ``config.name``, built from its own section (``config.lastro``, ``config.resnet`` ...)
    for inputs of ``pixel_scale`` arcsec per pixel (``input_pixel_scale`` of the store's transform)."""
    return model_spec(config.name).build(model_section(config), in_channels, image_size, pixel_scale)


def input_pixel_scale(transform: dict[str, Any] | None) -> InputScale:
    """Arcsec per network input pixel for a store's recorded ``transform``: the reference band's scale
    (``reference_pixel_scale``; a challenge store records none: VIS) times the binning, carrying the
    channels' native scales (``native_pixel_scales``; None for a challenge store: VIS first, then NIR)."""
    transform = transform or {}
    reference = float(transform.get("reference_pixel_scale") or VIS_PIXEL_SCALE)
    native = transform.get("native_pixel_scales")
    profile = (transform.get("profile") or {}).get("name", DEFAULT_PROFILE)
    return InputScale(
        reference * int(transform.get("bin") or 1),
        native=None if native is None else tuple(float(s) for s in native),
        reference=reference,
        profile=profile,
    )


def describe_model(config: ModelConfig) -> str:
    """The configured network in a few words, e.g. ``LASTRO 2x2 conv, 16 filters``."""
    return model_spec(config.name).describe(model_section(config))


def model_recipe(config: ModelConfig) -> list[str]:
    """The configured network's distinguishing choices (block order, dropout, init ...)."""
    return model_spec(config.name).recipe(model_section(config))


def tunable_prefixes() -> dict[str, str]:
    """``{"model.lastro.": "lastro", ...}``: a tune key under one of these varies that network."""
    return {f"model.{spec.section}.": name for name, spec in MODELS.items()}


__all__ = [
    "MODELS",
    "InputScale",
    "Lastro",
    "ModelBuilder",
    "ModelSpec",
    "ResNet",
    "TwoBranch",
    "ViT",
    "build_model",
    "describe_model",
    "input_pixel_scale",
    "model_recipe",
    "model_section",
    "model_spec",
    "tunable_prefixes",
]
