"""A small vision transformer (Dosovitskiy et al. 2021) for lens finding: a strided conv cuts the image
into ``patch`` x ``patch`` tokens, a learned class token and learned positions are added, pre-norm
``nn.TransformerEncoder`` layers mix them, and a linear head on the class token gives one logit.

Sized for cutouts: patch 10, width 64, 4 layers, 4 heads by default (~0.2 M parameters; 5-px patches,
100 tokens on a 50-px cutout, fitted the sanity check's 64 cutouts too slowly and cost 4x the time).
Pixels beyond the last whole patch (an image side not a multiple of ``patch``) are not seen.
"""

from __future__ import annotations

import torch
from torch import nn

from lensray.config import ViTConfig
from lensray.sky.bands import VIS_PIXEL_SCALE


class ViT(nn.Module):
    """Vision transformer for ``in_channels`` x ``image_size`` x ``image_size`` inputs; ``forward``
    returns one logit per image, shape (N,)."""

    def __init__(self, config: ViTConfig, in_channels: int, image_size: int) -> None:
        super().__init__()
        if in_channels < 1 or image_size < 1:
            raise ValueError(f"vit: need in_channels >= 1 and image_size >= 1, got {in_channels} and {image_size}")
        if config.patch > image_size:
            raise ValueError(f"vit: patch={config.patch} is larger than the {image_size}-px image")
        self.config = config
        self.tokens_per_side = image_size // config.patch
        self.embed = nn.Conv2d(in_channels, config.width, config.patch, stride=config.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.positions = nn.Parameter(torch.zeros(1, 1 + self.tokens_per_side**2, config.width))
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            dim_feedforward=round(config.mlp_ratio * config.width),
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,  # pre-norm: trains without a long warmup
        )
        # enable_nested_tensor only pays off with padding masks, and warns for pre-norm layers.
        self.encoder = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.drop = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.width, 1)
        nn.init.trunc_normal_(self.positions, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2)  # (N, T, width)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.positions
        encoded = self.norm(self.encoder(tokens)[:, 0])
        return self.out(self.drop(encoded)).squeeze(1)


def build_vit(config: ViTConfig, in_channels: int, image_size: int, pixel_scale: float = VIS_PIXEL_SCALE) -> ViT:
    """Registry entry: the transformer of ``config`` for ``in_channels`` bands of ``image_size`` px
    (``pixel_scale`` is not used: patches are in input pixels)."""
    return ViT(config, in_channels, image_size)


def describe_vit(config: ViTConfig) -> str:
    """The network in a table cell, e.g. ``ViT 4x64, patch 10``."""
    return f"ViT {config.depth}x{config.width}, patch {config.patch}"


def vit_recipe(config: ViTConfig) -> list[str]:
    """The choices that set this network apart in a comparison."""
    return [f"{config.heads} heads", f"mlp x{config.mlp_ratio:g}", f"dropout {config.dropout:g}"]
