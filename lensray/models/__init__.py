"""The networks, in a plain registry: ``MODELS[name](section, in_channels, image_size) -> nn.Module``.

Every model maps (N, in_channels, image_size, image_size) images to one lens logit per image, shape
(N,) (apply a sigmoid for a probability; train with ``BCEWithLogitsLoss``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lensray.config import ModelConfig
from lensray.models.lastro import Lastro, build_lastro
from lensray.models.resnet import ResNet, build_resnet

ModelBuilder = Callable[[Any, int, int], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "resnet": build_resnet,
    "lastro": build_lastro,
}


def build_model(config: ModelConfig, in_channels: int, image_size: int) -> nn.Module:
    """The network ``config.name``, built from its own section (``config.lastro`` or ``config.resnet``)."""
    if config.name not in MODELS:
        raise ValueError(f"unknown model {config.name!r}; registered: {sorted(MODELS)}")
    return MODELS[config.name](getattr(config, config.name), in_channels, image_size)


__all__ = ["MODELS", "Lastro", "ModelBuilder", "ResNet", "build_model"]
