"""The Keras CIFAR-10 ResNet v1 (He et al. 2016, the ``keras/examples/cifar10_resnet.py`` ``resnet_v1``)
that the study used, with one lens logit instead of ten class scores.

Depth = 6 * blocks + 2: a stem conv, three stages of ``blocks`` basic blocks (widths 16, 32, 64;
the first block of stages 2 and 3 halves the map with stride 2 and a 1x1 projection shortcut), an
average pool of width ``pool`` (Keras ``AveragePooling2D(pool_size=8)``), flatten, dense. ``blocks=3``
is ResNet-20 (9 residual blocks in all), the study's setting. ``kernel`` (3 in Keras) sizes every
conv but the 1x1 projections, the stem's included.

Differences from the Keras model, all of torch convention: convs feeding a BN carry no bias (the BN
shift makes it redundant), BN running statistics are buffers, not parameters, and the projection
shortcut is conv + BN (Keras: conv with bias, no BN).
"""

from __future__ import annotations

import torch
from torch import nn

from lensray.config import ResNetConfig
from lensray.models.init_weights import kaiming_init
from lensray.sky.bands import VIS_PIXEL_SCALE


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int) -> list[nn.Module]:
    # Odd kernel + padding k//2 is Keras "same": the output side is ceil(side / stride).
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut, then ReLU (ResNet v1: activation after the addition)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            *_conv_bn(in_channels, out_channels, kernel, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(out_channels, out_channels, kernel, 1),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Keras CIFAR ResNet v1 for ``in_channels`` x ``image_size`` x ``image_size`` inputs.

    ``forward`` returns one logit per image, shape (N,).
    """

    def __init__(self, config: ResNetConfig, in_channels: int, image_size: int) -> None:
        super().__init__()
        if in_channels < 1 or image_size < 1:
            raise ValueError(f"resnet: need in_channels >= 1 and image_size >= 1, got {in_channels} and {image_size}")
        if config.kernel % 2 == 0:
            # An even kernel has no symmetric "same" padding for the stride-2 convs.
            raise ValueError(f"resnet: kernel={config.kernel} must be odd")
        self.config = config
        first = config.widths[0]
        self.stem = nn.Sequential(*_conv_bn(in_channels, first, config.kernel, 1), nn.ReLU(inplace=True))

        stages: list[nn.Module] = []
        channels, side = first, image_size
        for stage, width in enumerate(config.widths):
            blocks = []
            for index in range(config.blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, width, config.kernel, stride))
                channels = width
                side = -(-side // stride)
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        # Keras pools with stride = width and no padding; on a map smaller than the pool fall back to
        # a global average instead of failing, so small cutouts (e.g. 20 px -> 5 px maps) still work.
        pool = min(config.pool, side)
        self.pool = nn.AvgPool2d(pool)
        pooled = side // pool
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity(),
            nn.Linear(channels * pooled * pooled, 1),
        )
        if config.init == "kaiming":
            kaiming_init(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.stages(self.stem(images)))
        return self.head(features).squeeze(1)


def build_resnet(
    config: ResNetConfig, in_channels: int, image_size: int, pixel_scale: float = VIS_PIXEL_SCALE
) -> ResNet:
    """Registry entry: the ResNet of ``config`` for ``in_channels`` bands of ``image_size`` px
    (``pixel_scale`` is not used)."""
    return ResNet(config, in_channels, image_size)


def describe_resnet(config: ResNetConfig) -> str:
    """The network in a table cell, e.g. ``ResNet-20`` (6n + 2 layers for n blocks per stage)."""
    return f"ResNet-{6 * config.blocks + 2}"


def resnet_recipe(config: ResNetConfig) -> list[str]:
    """The choices that set this network apart in a comparison."""
    return [f"{config.init} init"]
