"""A two-branch VIS/NIR network, after the Euclid strong-lensing challenge 2.0 winners (VIS and NIR each
at native resolution, merged late).

The store puts every band on the VIS grid (VIS first, the NIR bands upsampled onto it, then cropped and
binned), so the NIR channels carry 3x (bin 1) or 1.5x (bin 2) more pixels than they were observed with.
The NIR branch first average-pools them back to their native sampling: ``round(H * s_in / s_NIR)`` pixels
a side, ``s_in`` the input pixel scale (VIS scale x bin) and ``s_NIR`` = 0.3". Each branch is its own
stack of conv-BN-ReLU pairs with 2x2 max-pools; each branch's last map is average-pooled to ``pooled`` x
``pooled`` (3: centre and surroundings stay apart, as a ring round a galaxy needs) and flattened, the two
are concatenated, and a dense layer gives one logit. A global average (``pooled`` 1) made the network fit
the sanity check's 64 cutouts too slowly to pass it (eval loss 0.36-0.48 after 60 steps at Adam 3e-4). With one band (VIS only) the network is the VIS branch alone.

Which channels are which comes from the store's profile: ``pixel_scale`` is an ``InputScale`` carrying
each channel's native pixel scale; channels at the reference scale feed the first branch, the coarser
ones the second, pooled to the finest of their native scales. A store that recorded no native scales
(the challenge layout) has channel 0 = VIS and the rest NIR at 0.3". A profile whose bands are all on
the reference scale (HSC, LSST, Euclid MER) has nothing for the second branch: that is a ConfigError at
build time (use lastro, resnet or vit).
"""

from __future__ import annotations

import torch
from torch import nn

from lensray.config import TwoBranchConfig
from lensray.errors import ConfigError
from lensray.models.init_weights import kaiming_init
from lensray.profiles import DEFAULT_PROFILE
from lensray.sky.bands import BANDS, NIR_BANDS, VIS_PIXEL_SCALE

NIR_PIXEL_SCALE = BANDS[NIR_BANDS[0]].pixel_scale


class InputScale(float):
    """Arcsec per network input pixel, carrying what the store recorded about its channels: ``native``
    (each channel's native pixel scale, None where the store recorded none: the challenge layout),
    ``reference`` (the reference band's native scale) and the ``profile``'s name."""

    native: tuple[float, ...] | None
    reference: float
    profile: str

    def __new__(
        cls,
        value: float,
        native: tuple[float, ...] | None = None,
        reference: float = VIS_PIXEL_SCALE,
        profile: str = DEFAULT_PROFILE,
    ) -> InputScale:
        scale = super().__new__(cls, value)
        scale.native, scale.reference, scale.profile = native, float(reference), profile
        return scale

    def __reduce__(self) -> tuple:
        return (InputScale, (float(self), self.native, self.reference, self.profile))


def channel_groups(in_channels: int, pixel_scale: float) -> tuple[list[int], list[int], float]:
    """(channels at the reference scale, coarser channels, the coarse branch's pixel scale) for the input."""
    native = getattr(pixel_scale, "native", None)
    if native is None:  # the challenge layout: VIS first, the NIR bands after it
        return [0], list(range(1, in_channels)), NIR_PIXEL_SCALE
    if len(native) != in_channels:
        raise ConfigError(f"twobranch: {in_channels} input channels but {len(native)} native pixel scales recorded")
    finest = min(native)  # the reference scale when the reference band is among the channels
    fine = [k for k, s in enumerate(native) if s <= finest * (1 + 1e-6)]
    coarse = [k for k in range(in_channels) if k not in fine]
    if not coarse:
        raise ConfigError(
            f"twobranch needs bands at two pixel scales; profile {pixel_scale.profile} has one "
            f'({finest:g}"/px): use lastro/resnet/vit'
        )
    return fine, coarse, min((native[k] for k in coarse), default=NIR_PIXEL_SCALE)


def nir_side(image_size: int, pixel_scale: float = VIS_PIXEL_SCALE, nir_scale: float = NIR_PIXEL_SCALE) -> int:
    """Coarse-band pixels a side of an ``image_size`` input of ``pixel_scale`` arcsec per pixel (>= 1)."""
    return max(1, round(image_size * pixel_scale / nir_scale))


def _branch(config: TwoBranchConfig, in_channels: int, blocks: int) -> tuple[nn.Sequential, int]:
    """conv-BN-ReLU x 2 then a 2x2 max-pool, ``blocks`` times; (stack, output channels)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for block in range(blocks):
        width = config.filters * 2**block
        for conv_in in (channels, width):
            # The BN shift makes a conv bias redundant.
            layers += [
                nn.Conv2d(conv_in, width, config.kernel, padding=config.kernel // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
        # ceil_mode: a map of 1 px stays 1 px, so small cutouts never pool to nothing.
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
        channels = width
    # An average-pooled pooled x pooled map keeps where the light is (a ring round the centre) that a
    # global average (pooled=1) throws away.
    layers += [nn.AdaptiveAvgPool2d(config.pooled), nn.Flatten()]
    return nn.Sequential(*layers), channels * config.pooled**2


class TwoBranch(nn.Module):
    """Two-branch CNN for ``in_channels`` x ``image_size`` x ``image_size`` inputs of ``pixel_scale``
    arcsec per pixel. ``forward`` returns one logit per image, shape (N,)."""

    def __init__(
        self, config: TwoBranchConfig, in_channels: int, image_size: int, pixel_scale: float = VIS_PIXEL_SCALE
    ) -> None:
        super().__init__()
        if in_channels < 1 or image_size < 1:
            raise ValueError(
                f"twobranch: need in_channels >= 1 and image_size >= 1, got {in_channels} and {image_size}"
            )
        if config.kernel % 2 == 0:
            raise ValueError(f"twobranch: kernel={config.kernel} must be odd")
        self.config = config
        fine, coarse, coarse_scale = channel_groups(in_channels, pixel_scale)
        # Not in the state dict: the channel split is rebuilt from the store's record, like the shapes.
        self.register_buffer("fine_channels", torch.tensor(fine), persistent=False)
        self.register_buffer("coarse_channels", torch.tensor(coarse, dtype=torch.long), persistent=False)
        self.nir_side = nir_side(image_size, pixel_scale, coarse_scale)
        self.vis, features = _branch(config, len(fine), config.blocks)
        self.nir: nn.Module | None = None
        if coarse:
            self.nir_pool = nn.AdaptiveAvgPool2d(self.nir_side)
            self.nir, nir_features = _branch(config, len(coarse), config.nir_blocks or config.blocks)
            features += nir_features
        self.head = nn.Sequential(
            nn.Linear(features, config.dense),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity(),
            nn.Linear(config.dense, 1),
        )
        if config.init == "kaiming":
            kaiming_init(self)

    def split(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(reference-scale channels (N, c, H, W), coarser ones at their native sampling (N, C - c, h, h)
        or None): what each branch sees (challenge: VIS, then the NIR bands)."""
        vis = images.index_select(1, self.fine_channels)
        if self.nir is None:
            return vis, None
        return vis, self.nir_pool(images.index_select(1, self.coarse_channels))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vis, nir = self.split(images)
        features = self.vis(vis).flatten(1)
        if nir is not None:
            features = torch.cat([features, self.nir(nir).flatten(1)], dim=1)
        return self.head(features).squeeze(1)


def build_twobranch(
    config: TwoBranchConfig, in_channels: int, image_size: int, pixel_scale: float = VIS_PIXEL_SCALE
) -> TwoBranch:
    """Registry entry: the two-branch network of ``config`` for ``in_channels`` bands of ``image_size`` px."""
    return TwoBranch(config, in_channels, image_size, pixel_scale)


def describe_twobranch(config: TwoBranchConfig) -> str:
    """The network in a table cell, e.g. ``two-branch VIS/NIR 3+2 blocks, 16 filters``."""
    return f"two-branch VIS/NIR {config.blocks}+{config.nir_blocks or config.blocks} blocks, {config.filters} filters"


def twobranch_recipe(config: TwoBranchConfig) -> list[str]:
    """The choices that set this network apart in a comparison."""
    return ["NIR at native sampling", "late merge", f"dropout {config.dropout:g}", f"{config.init} init"]
