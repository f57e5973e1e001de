"""Freezing the first blocks of a network for fine-tuning (``train.freeze``).

A *block* is the unit a fine-tune keeps or retrains, from the input side:

- LASTRO: one conv pair with its batch norms (everything before the pair's max-pool);
- ResNet: the stem, then each of the 3 stages;
- two-branch: block i of the VIS branch and block i of the NIR branch together (conv-BN-ReLU x 2 + pool);
- ViT: the patch embedding with the class token and the positions, then each encoder layer.

The head is never a block: freezing every block still trains it. Frozen parameters get
``requires_grad=False`` (the optimiser is built over the trainable ones only) and the batch norms of
frozen blocks stay in eval mode, so their running statistics are kept too. Plain torch: no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lensray.errors import ConfigError
from lensray.models.lastro import Lastro
from lensray.models.resnet import ResNet
from lensray.models.twobranch import TwoBranch
from lensray.models.vit import ViT


def _pooled_blocks(stack: nn.Sequential, prefix: str) -> list[list[str]]:
    """Prefixes of the parameterised layers of a conv stack, grouped by the max-pools that end each block."""
    blocks: list[list[str]] = [[]]
    for index, layer in enumerate(stack):
        if isinstance(layer, nn.MaxPool2d):
            blocks.append([])
        elif any(True for _ in layer.parameters(recurse=True)) or any(True for _ in layer.buffers()):
            blocks[-1].append(f"{prefix}.{index}")
    return [block for block in blocks if block]


def network_blocks(model: nn.Module) -> list[list[str]]:
    """The blocks of a registered network, input side first: each a list of module or parameter name prefixes."""
    if isinstance(model, Lastro):
        return _pooled_blocks(model.features, "features")
    if isinstance(model, ResNet):
        return [["stem"], *([f"stages.{i}"] for i in range(len(model.stages)))]
    if isinstance(model, TwoBranch):
        vis = _pooled_blocks(model.vis, "vis")
        nir = _pooled_blocks(model.nir, "nir") if model.nir is not None else []
        return [
            (vis[i] if i < len(vis) else []) + (nir[i] if i < len(nir) else []) for i in range(max(len(vis), len(nir)))
        ]
    if isinstance(model, ViT):
        return [
            ["embed", "cls_token", "positions"],
            *([f"encoder.layers.{i}"] for i in range(len(model.encoder.layers))),
        ]
    raise ConfigError(f"train.freeze: no blocks defined for {type(model).__name__} (lensray/models/freeze.py)")


def frozen_prefixes(model: nn.Module, n: int) -> tuple[str, ...]:
    """The name prefixes of the first ``n`` blocks; ConfigError when the network has fewer."""
    blocks = network_blocks(model)
    if n > len(blocks):
        raise ConfigError(
            f"train.freeze={n}: {type(model).__name__} has {len(blocks)} blocks (lensray/models/freeze.py)"
        )
    return tuple(prefix for block in blocks[:n] for prefix in block)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Frozen:
    """What ``freeze`` did: the frozen prefixes and parameters, and the element counts either side."""

    prefixes: tuple[str, ...]
    parameters: tuple[str, ...]
    frozen: int  # parameter elements kept fixed
    trainable: int  # parameter elements trained


def freeze(model: nn.Module, n: int) -> Frozen:
    """Freeze the first ``n`` blocks of the bare ``model`` (before DDP wraps it) in place."""
    prefixes = frozen_prefixes(model, n) if n else ()
    names = []
    for name, parameter in model.named_parameters():
        if _under(name, prefixes):
            parameter.requires_grad_(False)
            names.append(name)
    norms = [
        m
        for name, m in model.named_modules()
        if _under(name, prefixes) and isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if norms:
        # model.train() (every epoch, the sanity check) would switch them back: re-set before each forward.
        def keep_in_eval(module: nn.Module, args: object) -> None:
            for norm in norms:
                norm.eval()

        model.register_forward_pre_hook(keep_in_eval)
    counts = [(p.numel(), p.requires_grad) for p in model.parameters()]
    return Frozen(
        prefixes=prefixes,
        parameters=tuple(names),
        frozen=sum(n for n, trained in counts if not trained),
        trainable=sum(n for n, trained in counts if trained),
    )
