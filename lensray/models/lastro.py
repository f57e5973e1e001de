"""The LASTRO CNN as the study used it, after Schaefer et al. 2018 (A&A 611, A2: "Deep convolutional
neural networks as strong gravitational lens detectors").

``pairs`` blocks of two "same"-padded convs (kernels ``first_kernel`` then ``kernel``; ``filters``
doubling per pair), each block followed by a max-pool of width ``pool`` and optional dropout
(spatial = ``Dropout2d``, standard = ``Dropout``), then flatten, ``dense`` hidden layers with ReLU and
dropout, and one output logit.

``block_order`` picks the conv block: ``"bn_relu"`` (conv->BN->ReLU for each conv; the platform default,
which learns) or ``"paper"`` (the study's conv->ReLU->conv->ReLU->BN, kept to reproduce the study, which
does not learn on this data).
"""

from __future__ import annotations

import torch
from torch import nn

from lensray.config import LastroConfig
from lensray.models.init_weights import kaiming_init
from lensray.sky.bands import VIS_PIXEL_SCALE


def _conv(in_channels: int, out_channels: int, kernel: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, padding="same", bias=bias)


def _conv_pair(config: LastroConfig, in_channels: int, out_channels: int) -> list[nn.Module]:
    if config.block_order == "bn_relu":
        # The BN shift makes a conv bias redundant.
        return [
            _conv(in_channels, out_channels, config.first_kernel, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            _conv(out_channels, out_channels, config.kernel, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return [
        _conv(in_channels, out_channels, config.first_kernel, bias=True),
        nn.ReLU(inplace=True),
        _conv(out_channels, out_channels, config.kernel, bias=True),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(out_channels),
    ]


def _conv_dropout(config: LastroConfig) -> list[nn.Module]:
    if config.dropout_kind == "none" or config.dropout == 0:
        return []
    if config.dropout_kind == "spatial":
        return [nn.Dropout2d(config.dropout)]  # drops whole feature maps
    return [nn.Dropout(config.dropout)]


class Lastro(nn.Module):
    """LASTRO-like CNN for ``in_channels`` x ``image_size`` x ``image_size`` inputs.

    ``forward`` returns one logit per image, shape (N,). Raises ValueError at construction when
    ``pairs`` max-pools of width ``pool`` would shrink the map below one pixel.
    """

    def __init__(self, config: LastroConfig, in_channels: int, image_size: int) -> None:
        super().__init__()
        if in_channels < 1 or image_size < 1:
            raise ValueError(f"lastro: need in_channels >= 1 and image_size >= 1, got {in_channels} and {image_size}")
        self.config = config
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for pair in range(config.pairs):
            width = config.filters * 2**pair
            layers += _conv_pair(config, channels, width)
            # Keras MaxPooling2D: stride = width, no padding -> floor(side / pool).
            layers.append(nn.MaxPool2d(config.pool))
            layers += _conv_dropout(config)
            channels, side = width, side // config.pool
            if side < 1:
                raise ValueError(
                    f"lastro: a {image_size}x{image_size} input is too small for pairs={config.pairs} "
                    f"with pool={config.pool}: max-pool {pair + 1} leaves a map under 1 px; "
                    f"use a larger image, fewer pairs or a smaller pool"
                )
        self.features = nn.Sequential(*layers)

        head: list[nn.Module] = [nn.Flatten()]
        width_in = channels * side * side
        for width in config.dense:
            head += [nn.Linear(width_in, width), nn.ReLU(inplace=True)]
            if config.dense_dropout > 0:
                head.append(nn.Dropout(config.dense_dropout))
            width_in = width
        head.append(nn.Linear(width_in, 1))
        self.head = nn.Sequential(*head)
        if config.init == "kaiming":
            kaiming_init(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(1)


def build_lastro(
    config: LastroConfig, in_channels: int, image_size: int, pixel_scale: float = VIS_PIXEL_SCALE
) -> Lastro:
    """Registry entry: the LASTRO CNN of ``config`` for ``in_channels`` bands of ``image_size`` px
    (``pixel_scale`` is not used)."""
    return Lastro(config, in_channels, image_size)


def describe_lastro(config: LastroConfig) -> str:
    """The network in a table cell, e.g. ``LASTRO 2x2 conv, 16 filters``."""
    return f"LASTRO {config.pairs}x2 conv, {config.filters} filters"


def lastro_recipe(config: LastroConfig) -> list[str]:
    """The choices that set this network apart in a comparison: block order, dropout, init."""
    parts = ["conv-ReLU-conv-ReLU-BN" if config.block_order == "paper" else "conv-BN-ReLU"]
    if config.dropout_kind != "none" and config.dropout > 0:
        parts.append(f"{config.dropout_kind} dropout {config.dropout:g}")
    else:
        parts.append("no conv dropout")
    parts.append(f"dense dropout {config.dense_dropout:g}")
    parts.append(f"{config.init} init")
    return parts
