"""Every registered network: shapes, gradients, config knobs, errors, determinism, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lensray.config import LastroConfig, ModelConfig, ResNetConfig, TwoBranchConfig, ViTConfig
from lensray.models import MODELS, Lastro, ResNet, TwoBranch, ViT, build_model, describe_model, model_recipe
from lensray.models.resnet import BasicBlock


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def default_section(name: str) -> LastroConfig | ResNetConfig:
    return getattr(ModelConfig(), name)


def layers_of(model: nn.Module, kind: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("size", [32, 50])
@pytest.mark.parametrize("bands", [1, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_every_model(name: str, bands: int, size: int) -> None:
    torch.manual_seed(0)
    model = MODELS[name].build(default_section(name), bands, size)
    images = torch.randn(4, bands, size, size)
    logits = model(images)
    assert logits.shape == (4,)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient on {pname}"


@pytest.mark.parametrize("size", [64, 100, 200])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_any_square_size_gives_one_logit_per_image(name: str, size: int) -> None:
    model = MODELS[name].build(default_section(name), 4, size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 4, size, size)).shape == (2,)


def test_build_model_uses_the_named_section() -> None:
    config = ModelConfig(name="resnet", resnet=ResNetConfig(blocks=1), lastro=LastroConfig(pairs=1))
    resnet = build_model(config, 4, 32)
    assert isinstance(resnet, ResNet) and len(layers_of(resnet, BasicBlock)) == 3
    lastro = build_model(config.model_copy(update={"name": "lastro"}), 4, 32)
    assert isinstance(lastro, Lastro) and len(layers_of(lastro, nn.MaxPool2d)) == 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_mode_is_deterministic(name: str) -> None:
    section = default_section(name).model_copy(update={"dropout": 0.3})
    model = MODELS[name].build(section, 4, 32)
    images = torch.randn(8, 4, 32, 32)
    model.train()
    with torch.no_grad():
        model(images)  # move BN running statistics away from their initial values
        model.eval()
        first, second = model(images), model(images)
    assert torch.equal(first, second)


def test_dropout_is_random_in_train_mode() -> None:
    # The counterpart of the eval test: dropout really acts in training.
    model = Lastro(LastroConfig(), 4, 32).train()
    images = torch.randn(8, 4, 32, 32)
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))


# ---- lastro knobs -------------------------------------------------------------------------------


def test_lastro_kernels_filters_and_pool_follow_the_config() -> None:
    config = LastroConfig(filters=8, pairs=2, first_kernel=7, kernel=5, pool=2)
    model = Lastro(config, 4, 32)
    convs = layers_of(model, nn.Conv2d)
    assert [c.kernel_size for c in convs] == [(7, 7), (5, 5), (7, 7), (5, 5)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16]
    assert [p.kernel_size for p in layers_of(model, nn.MaxPool2d)] == [2, 2]
    # 32 -> 16 -> 8 px of 16 maps feed the first dense layer.
    assert layers_of(model, nn.Linear)[0].in_features == 16 * 8 * 8


def test_lastro_dense_layers_follow_the_config() -> None:
    model = Lastro(LastroConfig(dense=(64, 32), dense_dropout=0.4), 4, 32)
    assert [(d.in_features, d.out_features) for d in layers_of(model, nn.Linear)][1:] == [(64, 32), (32, 1)]
    assert [d.p for d in layers_of(model.head, nn.Dropout)] == [0.4, 0.4]


@pytest.mark.parametrize(
    ("kind", "present", "absent"),
    [("spatial", nn.Dropout2d, nn.Dropout), ("standard", nn.Dropout, nn.Dropout2d), ("none", None, None)],
)
def test_lastro_dropout_kind(kind: str, present: type | None, absent: type | None) -> None:
    model = Lastro(LastroConfig(dropout_kind=kind, dropout=0.25), 4, 32)
    conv_dropouts = [m for m in model.features if isinstance(m, (nn.Dropout, nn.Dropout2d))]
    if present is None:
        assert conv_dropouts == []
    else:
        assert len(conv_dropouts) == 3  # one per conv pair
        assert all(type(m) is present and m.p == 0.25 for m in conv_dropouts)
        assert not any(type(m) is absent for m in conv_dropouts)


def test_lastro_block_orders_differ() -> None:
    def block_types(order: str) -> list[str]:
        model = Lastro(LastroConfig(block_order=order, dropout_kind="none", pairs=1), 4, 32)
        return [type(m).__name__ for m in model.features]

    assert block_types("bn_relu") == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
    ]
    assert block_types("paper") == ["Conv2d", "ReLU", "Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"]


def test_lastro_init_option_changes_weights() -> None:
    torch.manual_seed(0)
    kaiming = Lastro(LastroConfig(init="kaiming"), 4, 32)
    torch.manual_seed(0)
    default = Lastro(LastroConfig(init="default"), 4, 32)
    first_kaiming, first_default = layers_of(kaiming, nn.Conv2d)[0], layers_of(default, nn.Conv2d)[0]
    fan_in = 4 * 5 * 5
    # He normal: std sqrt(2 / fan_in); torch's default Kaiming-uniform(a=sqrt 5): std 1 / sqrt(3 fan_in).
    assert first_kaiming.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
    assert first_default.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)


def test_lastro_too_small_input_is_a_clear_error() -> None:
    # 20 px -> 6 -> 2 -> 0 after three max-pools of width 3.
    with pytest.raises(ValueError, match=r"20x20 input is too small for pairs=3 with pool=3"):
        Lastro(LastroConfig(pairs=3, pool=3), 4, 20)
    Lastro(LastroConfig(pairs=3, pool=3), 4, 27)  # 27 -> 9 -> 3 -> 1: just fits


# ---- resnet knobs -------------------------------------------------------------------------------


def keras_resnet_v1_param_count(blocks: int, in_channels: int, widths: tuple[int, ...], outputs: int) -> int:
    """Parameters of keras/examples cifar10_resnet.py ``resnet_v1`` (global pool reduces to 1x1):
    every conv has a bias, every BN counts 4 numbers per channel (gamma, beta, moving mean and
    variance), and the 1x1 projection shortcuts have no BN."""

    def conv(cin: int, cout: int, k: int) -> int:
        return k * k * cin * cout + cout

    count = conv(in_channels, widths[0], 3) + 4 * widths[0]
    channels = widths[0]
    for width in widths:
        for _ in range(blocks):
            count += conv(channels, width, 3) + conv(width, width, 3) + 2 * 4 * width
            if channels != width:
                count += conv(channels, width, 1)
            channels = width
    return count + channels * outputs + outputs


def test_resnet20_matches_the_keras_parameter_count() -> None:
    widths = (16, 32, 64)
    keras_cifar10 = keras_resnet_v1_param_count(3, 3, widths, outputs=10)
    assert keras_cifar10 == 274_442  # Keras' model.summary() total for ResNet20v1 on CIFAR-10 (0.27M)

    model = ResNet(ResNetConfig(blocks=3), 3, 32)
    assert len(layers_of(model, BasicBlock)) == 9  # 6 * 3 + 2 = 20 layers
    keras_one_logit = keras_resnet_v1_param_count(3, 3, widths, outputs=1)
    convs_before_bn = widths[0] + sum(6 * w for w in widths)  # stem + two per block
    projections = sum(widths[1:])
    # torch convention: no conv bias before a BN (-convs_before_bn, -projections), BN running stats are
    # buffers (-2 per BN channel), and our projections carry a BN (+2 per channel).
    expected = keras_one_logit - convs_before_bn - projections - 2 * convs_before_bn + 2 * projections
    assert param_count(model) == expected
    assert param_count(model) == pytest.approx(keras_one_logit, rel=0.015)


def test_resnet_depth_sets_the_number_of_blocks() -> None:
    counts = {}
    for blocks in (1, 2, 3):
        model = ResNet(ResNetConfig(blocks=blocks), 4, 32)
        assert len(layers_of(model, BasicBlock)) == 3 * blocks
        assert len(layers_of(model, nn.Conv2d)) == 6 * blocks + 1 + 2  # + stem + two projections
        counts[blocks] = param_count(model)
    assert counts[1] < counts[2] < counts[3]


def test_resnet_kernel_widths_and_downsampling_follow_the_config() -> None:
    model = ResNet(ResNetConfig(blocks=1, widths=(8, 16, 24), kernel=5), 4, 32)
    convs = layers_of(model, nn.Conv2d)
    assert {c.kernel_size for c in convs} == {(5, 5), (1, 1)}
    assert [c.out_channels for c in convs if c.kernel_size == (5, 5)] == [8, 8, 8, 16, 16, 24, 24]
    assert [c.stride for c in convs if c.kernel_size == (1, 1)] == [(2, 2), (2, 2)]


@pytest.mark.parametrize(
    ("size", "pool", "kernel", "features"),
    [
        (32, 8, 8, 64),  # 32 -> 8 px map: the Keras CIFAR case, one 8x8 pool
        (200, 8, 8, 64 * 6 * 6),  # 200 -> 50 px map, pool 8 -> 6x6
        (200, 4, 4, 64 * 12 * 12),
        (50, 8, 8, 64),  # 50 -> 13 px map, pool 8 -> 1x1
        (32, 16, 8, 64),  # 8 px map smaller than the pool: global average
        (20, 8, 5, 64),  # 20 -> 5 px map: global average
    ],
)
def test_resnet_pool_width(size: int, pool: int, kernel: int, features: int) -> None:
    model = ResNet(ResNetConfig(blocks=1, pool=pool), 4, size)
    assert model.pool.kernel_size == kernel
    assert layers_of(model, nn.Linear)[0].in_features == features
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 4, size, size)).shape == (1,)


def test_resnet_dropout_option() -> None:
    assert layers_of(ResNet(ResNetConfig(), 4, 32), nn.Dropout) == []
    assert [d.p for d in layers_of(ResNet(ResNetConfig(dropout=0.3), 4, 32), nn.Dropout)] == [0.3]


def test_resnet_even_kernel_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="kernel=4 must be odd"):
        ResNet(ResNetConfig(kernel=4), 4, 32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bad_band_count_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: need in_channels >= 1"):
        MODELS[name].build(default_section(name), 0, 32)


# ---- learning -----------------------------------------------------------------------------------


def blob_batch(n: int = 32, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the images hold a bright Gaussian blob at the centre, half only noise."""
    generator = torch.Generator().manual_seed(1)
    labels = (torch.arange(n) % 2).float()
    axis = torch.arange(size) - (size - 1) / 2
    blob = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * 3.0**2))
    images = torch.randn(n, 4, size, size, generator=generator) + 3.0 * labels[:, None, None, None] * blob
    return images, labels


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bn_relu_networks_learn_a_separable_batch(name: str) -> None:
    torch.manual_seed(0)
    images, labels = blob_batch()
    section = default_section(name)
    if name == "lastro":
        assert section.block_order == "bn_relu"  # the platform default is the order that learns
    model = MODELS[name].build(section, 4, 32).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = sum(losses[-5:]) / 5
    # Below half the chance-level loss ln 2, and below where it started.
    assert final < min(0.5 * math.log(2), losses[0]), f"{name}: loss {losses[0]:.3f} -> {final:.3f}"
    model.eval()
    with torch.no_grad():
        accuracy = ((model(images) > 0).float() == labels).float().mean().item()
    assert accuracy >= 0.9, f"{name}: eval accuracy {accuracy:.2f} on its own training batch"


# ---- the stronger networks: two-branch VIS/NIR and the vision transformer -----------------------

NEW_NETS = ("twobranch", "vit")


@pytest.mark.parametrize("size, scale", [(50, 0.2), (200, 0.1)])  # demo (crop 100, bin 2) and full size
@pytest.mark.parametrize("bands", [1, 4])
@pytest.mark.parametrize("name", NEW_NETS)
def test_new_nets_build_at_demo_and_full_size(name: str, bands: int, size: int, scale: float) -> None:
    torch.manual_seed(0)
    config = ModelConfig(name=name)
    model = build_model(config, bands, size, scale)
    batch = 2 if size == 50 else 1  # a transformer over 40x40 patches is slow on CPU
    logits = model(torch.randn(batch, bands, size, size))
    assert logits.shape == (batch,)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert 10_000 < param_count(model) < 1_000_000  # small nets, sized for cutouts
    assert MODELS[name].summary and describe_model(config) and model_recipe(config)


@pytest.mark.parametrize(
    "size, scale, side",
    [(50, 0.2, 33), (200, 0.1, 67), (100, 0.1, 33), (100, 0.3, 100)],  # bin 2, bin 1, crop 100 bin 1, NIR grid
)
def test_twobranch_sees_nir_at_native_sampling(size: int, scale: float, side: int) -> None:
    model = TwoBranch(TwoBranchConfig(), 4, size, scale)
    assert model.nir_side == side == round(size * scale / 0.3)
    images = torch.randn(2, 4, size, size)
    vis, nir = model.split(images)
    assert vis.shape == (2, 1, size, size) and torch.equal(vis, images[:, :1])  # VIS at full resolution
    assert nir.shape == (2, 3, side, side)
    if size == 50:  # 50 -> 33 px: pooling a constant image keeps it, and it is a mean, not a pick
        assert torch.allclose(model.split(torch.ones(1, 4, size, size))[1], torch.ones(1, 3, side, side))
        assert nir.abs().mean() < images[:, 1:].abs().mean()


def test_twobranch_with_vis_only_is_one_branch() -> None:
    single, both = TwoBranch(TwoBranchConfig(), 1, 50, 0.2), TwoBranch(TwoBranchConfig(), 4, 50, 0.2)
    assert single.nir is None and single.split(torch.randn(1, 1, 50, 50))[1] is None
    assert param_count(single) < param_count(both)
    assert len(layers_of(both, nn.MaxPool2d)) == TwoBranchConfig().blocks + TwoBranchConfig().nir_blocks


def test_registry_passes_the_pixel_scale_and_build_model_reads_the_store_binning() -> None:
    from lensray.models import input_pixel_scale

    assert input_pixel_scale({"bin": 2}) == pytest.approx(0.2)
    assert input_pixel_scale(None) == pytest.approx(0.1)
    assert build_model(ModelConfig(name="twobranch"), 4, 50, input_pixel_scale({"bin": 2})).nir_side == 33
    assert build_model(ModelConfig(name="twobranch"), 4, 50).nir_side == 17  # bin 1: 50 px = 5" = 17 NIR px


def test_vit_tokens_and_config_errors() -> None:
    model = ViT(ViTConfig(patch=5, width=32, heads=4, depth=2), 4, 52)
    assert model.tokens_per_side == 10 and model.positions.shape == (1, 101, 32)
    assert len(model.encoder.layers) == 2
    with pytest.raises(ValueError, match="vit: patch=60 is larger"):
        ViT(ViTConfig(patch=60), 4, 50)
    with pytest.raises(ValidationError, match="not a multiple of heads"):
        ViTConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="twobranch: kernel=4 must be odd"):
        TwoBranch(TwoBranchConfig(kernel=4), 4, 50)


@pytest.mark.parametrize("pooled", [1, 3])
def test_twobranch_head_sees_each_branch_pooled_to_a_small_map(pooled: int) -> None:
    # pooled=3 (the default) keeps where the light is, centre vs ring; pooled=1 is a global average.
    model = TwoBranch(TwoBranchConfig(filters=8, blocks=3, nir_blocks=2, pooled=pooled), 4, 50, 0.2)
    vis, nir = model.split(torch.randn(2, 4, 50, 50))
    assert model.vis(vis).shape == (2, 32 * pooled**2)  # 3 blocks: 8 -> 16 -> 32 channels
    assert model.nir(nir).shape == (2, 16 * pooled**2)  # 2 blocks: 8 -> 16
    assert model.head[0].in_features == 48 * pooled**2
    assert model(torch.randn(2, 4, 50, 50)).shape == (2,)
