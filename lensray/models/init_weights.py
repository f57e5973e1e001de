"""Weight initialisation shared by the networks (the ``init: kaiming`` config option)."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal weights (Keras' ``he_normal``: fan-in, ReLU gain), zero biases, identity BN.

    Torch's default (Kaiming-uniform with a = sqrt(5)) gives ReLU nets a third of the He variance,
    so activations shrink layer by layer; the study's Keras models used he_normal / glorot instead.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
