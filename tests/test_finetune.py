"""Fine-tuning (train.init_from, train.freeze) and training on several stores at once (data.stores)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from lensray.config import ModelConfig, config_from_dict, dump_config, load_config
from lensray.errors import ConfigError
from lensray.models import MODELS, build_model
from lensray.models.freeze import freeze, network_blocks
from lensray.runs import STATE_FILE, best_checkpoint
from lensray.train.feed import MixedBatchSampler, MixedFeed
from lensray.train.finetune import check_training
from lensray.train.loop import LoopState
from lensray.train.trainer import train

SIDE = 16
OFFSET_B = 50.0  # store b's images are shifted by this much: a batch shows where each sample came from


def _write_store(url: str, bands: list[str], offset: float, seed: int) -> str:
    from lensray.ingest.store import SPLITS, create_store, finalize_store, shard_ranges, write_shard

    n = 48
    labels = np.tile([0, 1], n // 2).astype(np.int8)
    split = np.full(n, SPLITS["train"], np.int8)
    split[32:] = SPLITS["val"]
    yy, xx = np.mgrid[:SIDE, :SIDE] - (SIDE - 1) / 2
    ring = np.exp(-((np.hypot(yy, xx) - 4.0) ** 2) / 2.0).astype(np.float32)
    images = np.random.default_rng(seed).normal(0, 1, (n, 2, SIDE, SIDE)).astype(np.float32) + offset
    images[labels == 1] += 3 * ring
    meta = {"preprocess": {"synthetic": True}, "label_rule": "paper", "bands": bands, "source": {"images": "synthetic"}}
    ids = np.arange(700000 + 1000 * seed, 700000 + 1000 * seed + n)
    create_store(
        url, ids=ids, labels=labels, split=split, channels=2, size=SIDE, dtype="float32", shard_size=16, meta=meta
    )
    for index, (lo, hi) in enumerate(shard_ranges(n, 16)):
        write_shard(url, index, images[lo:hi], np.ones(hi - lo, bool), [])
    finalize_store(url)
    return url


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("finetune")
    return {
        "a": _write_store(str(root / "a.zarr"), ["VIS", "H"], 0.0, 1),
        "b": _write_store(str(root / "b.zarr"), ["VIS", "H"], OFFSET_B, 2),
        "j": _write_store(str(root / "j.zarr"), ["VIS", "J"], 0.0, 3),
    }


def _overrides(out: Path, name: str, *extra: str) -> list[str]:
    return [
        f"train.out={out}",
        f"train.name={name}",
        "train.epochs=1",
        "train.steps_per_epoch=3",
        "train.batch_size=16",
        "train.sanity=false",
        "train.augment=none",
        "model.lastro.pairs=2",
        "model.lastro.filters=4",
        "model.lastro.dense=[8]",
        "optim.lr=0.01",
        *extra,
    ]


# --- the sampler and the mixed feed (no Ray) ----------------------------------------------------


def test_mixed_sampler_draws_each_store_at_its_weight_with_balanced_batches() -> None:
    labels = [np.tile([0, 1], 30).astype(np.int8), np.tile([0, 1, 1, 0], 5).astype(np.int8)]
    sampler = MixedBatchSampler(labels, [0.8, 0.2], batch_size=32, steps=250, seed=3)
    batches = list(sampler)
    stores = np.concatenate([s for s, _ in batches])
    share_b = float(np.mean(stores == 1))
    assert abs(share_b - 0.2) < 0.015, share_b  # 8,000 draws: sigma 0.0045
    for store_index, positions in batches:
        drawn = np.array([labels[k][p] for k, p in zip(store_index, positions, strict=True)])
        assert drawn.sum() == 16, "half lenses in every batch"
        assert all(p < len(labels[k]) for k, p in zip(store_index, positions, strict=True))
    again = list(MixedBatchSampler(labels, [0.8, 0.2], batch_size=32, steps=250, seed=3))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    sampler.set_epoch(1)
    assert not np.array_equal(next(iter(sampler))[1], batches[0][1]), "another epoch draws other batches"
    # Under DDP each rank draws from its own share of every store.
    ranks = [MixedBatchSampler(labels, [1, 1], 8, 20, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for k in (0, 1):
        seen = [{int(p) for s, ps in rank for p in ps[s == k]} for rank in ranks]
        assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_mixed_feed_takes_each_sample_from_its_store(stores: dict[str, str]) -> None:
    config = load_config(
        None, ["train.augment=none", "train.batch_size=16", "train.steps_per_epoch=40", "train.feed=stream"]
    )
    feed = MixedFeed([stores["a"], stores["b"]], [0.8, 0.2], config.train)
    from_b, total = 0, 0
    for images, labels in feed:
        assert images.shape == (16, 2, SIDE, SIDE) and images.dtype == torch.float32
        assert labels.sum().item() == 8
        from_b += int((images.mean(dim=(1, 2, 3)) > OFFSET_B / 2).sum())
        total += len(labels)
    assert abs(from_b / total - 0.2) < 0.05, from_b / total


# --- config ---------------------------------------------------------------------------------------


def test_config_round_trip_and_one_kind_of_store(tmp_path: Path) -> None:
    overrides = [
        "data.stores=[{url: s3://b/sim.zarr, weight: 0.8}, real.zarr]",
        "train.init_from=runs/source",
        "train.freeze=2",
        "train.select_on=1",
    ]
    config = load_config(None, overrides)
    assert [(s.url, s.weight) for s in config.data.stores] == [
        ("s3://b/sim.zarr", 0.8),
        (str(Path("real.zarr").resolve()), 1.0),
    ]
    assert config.train.init_from == str(Path("runs/source").resolve()) and config.train.freeze == 2
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    with pytest.raises(ConfigError, match="data.store .* or data.stores, not both"):
        load_config(None, ["data.store=x.zarr", "data.stores=[y.zarr]"])
    with pytest.raises(ConfigError, match="store repeated"):
        load_config(None, ["data.stores=[y.zarr, y.zarr]"])
    with pytest.raises(ConfigError, match="data.stores.0.weight"):
        load_config(None, ["data.stores=[{url: y.zarr, weight: 0}]"])
    with pytest.raises(ConfigError, match=r"data.store \(or data.stores\) is required"):
        config_from_dict({}).data.training_stores()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_network_has_blocks_to_freeze(name: str) -> None:
    model = build_model(ModelConfig(name=name), 4, 50)
    blocks = network_blocks(model)
    assert len(blocks) >= 2 and all(blocks)
    frozen = freeze(model, 1)
    assert frozen.frozen > 0 and frozen.trainable > 0
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(frozen.parameters)
    with pytest.raises(ConfigError, match=f"train.freeze={len(blocks) + 1}: .* has {len(blocks)} blocks"):
        freeze(build_model(ModelConfig(name=name), 4, 50), len(blocks) + 1)


# --- end to end on Ray ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_run(stores: dict[str, str], tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> str:
    out = tmp_path_factory.mktemp("finetune-runs")
    return train(load_config(None, [f"data.store={stores['a']}", *_overrides(out, "source")])).run_url


def _weights(checkpoint_url: str) -> dict[str, torch.Tensor]:
    state = LoopState.load(io.BytesIO((Path(checkpoint_url) / STATE_FILE).read_bytes()))
    return state.model


def test_finetune_on_two_weighted_stores_keeps_frozen_block_bit_identical(
    stores: dict[str, str], source_run: str, tmp_path: Path
) -> None:
    config = load_config(
        None,
        [
            f"data.stores=[{{url: '{stores['a']}', weight: 0.8}}, {{url: '{stores['b']}', weight: 0.2}}]",
            f"train.init_from={source_run}",
            "train.freeze=1",
            *_overrides(tmp_path, "tuned"),
        ],
    )
    outcome = train(config)
    before, after = _weights(best_checkpoint(source_run).url), _weights(outcome.best_checkpoint)
    frozen = [k for k in before if k.startswith(("features.0.", "features.1.", "features.3.", "features.4."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "frozen block (BN stats too) unchanged"
    trained = [k for k in before if k.startswith(("features.7.", "head.")) and before[k].is_floating_point()]
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))
    row = outcome.history[-1]
    assert set(row["val_auc_stores"]) == {stores["a"], stores["b"]}
    assert row["val_auc"] == row["val_auc_stores"][stores["a"]], "selected on the first store's val AUC"
    assert row["frozen_params"] > 0 and row["trainable_params"] > 0
    assert row["frozen"] == ["features.0", "features.1", "features.3", "features.4"]
    saved = load_config(Path(outcome.run_url) / "config.yaml")
    assert saved.train.init_from == source_run and saved.train.freeze == 1 and len(saved.data.stores) == 2


def test_finetune_mismatches_are_config_errors_naming_the_difference(stores: dict[str, str], source_run: str) -> None:
    def check(*overrides: str) -> None:
        check_training(load_config(None, [f"train.init_from={source_run}", *_overrides(Path("/tmp"), "x"), *overrides]))

    with pytest.raises(ConfigError, match=r"bands \['VIS', 'H'\], store .*j.zarr has bands \['VIS', 'J'\]"):
        check(f"data.store={stores['j']}")
    with pytest.raises(
        ConfigError, match=r"parameter features.0.weight has shape \(4, 2, 5, 5\) in the source vs \(8, 2, 5, 5\)"
    ):
        check(f"data.store={stores['a']}", "model.lastro.filters=8")
    with pytest.raises(ConfigError, match="the source is a lastro network, model.name is resnet"):
        check(f"data.store={stores['a']}", "model.name=resnet")
    with pytest.raises(ConfigError, match="train.freeze=3: Lastro has 2 blocks"):
        check(f"data.store={stores['a']}", "train.freeze=3")
    with pytest.raises(
        ConfigError, match=r"a.zarr and .*j.zarr cannot be trained on together: bands: \['VIS', 'H'\] vs \['VIS', 'J'\]"
    ):
        check(f"data.stores=['{stores['a']}', '{stores['j']}']")
    assert source_run in str(pytest.raises(ConfigError, check, f"data.store={stores['j']}").value)


def test_tune_passes_stores_init_and_freeze_through(
    stores: dict[str, str], source_run: str, tmp_path: Path, tiny_search_tree: Any
) -> None:
    from lensray.train.tune import run_tune, tune_spec_from_dict

    tree = tiny_search_tree(str(tmp_path), "mixed", init_from=source_run, freeze=1)
    tree["run"]["data"] = {"stores": [{"url": stores["a"], "weight": 0.8}, {"url": stores["b"], "weight": 0.2}]}
    tree["run"]["model"] = {"lastro": {"pairs": 2, "filters": 4, "dense": [8]}}
    tree["space"] = {"train.freeze": {"grid": [0, 2]}}
    spec = tune_spec_from_dict(tree, "t")
    trial = spec.trial_config({"train.freeze": 2}, out=str(tmp_path), name="train")
    assert trial.train.freeze == 2 and trial.train.init_from == source_run
    assert [(s.url, s.weight) for s in trial.data.stores] == [(stores["a"], 0.8), (stores["b"], 0.2)]
    assert tune_spec_from_dict(yaml.safe_load(spec.dump()), "saved").run == spec.run
    tree["run"]["train"]["freeze"] = 3
    with pytest.raises(ConfigError, match="train.freeze=3: Lastro has 2 blocks"):
        run_tune(tune_spec_from_dict(tree, "t"))  # before any trial starts
    assert not (tmp_path / "mixed").exists()


def test_cli_store_repeated_with_weights_and_finetune_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lensray.cli import _train_config, build_parser, resolve_paths

    monkeypatch.chdir(tmp_path)
    parser = build_parser()

    def config(*argv: str) -> Any:
        return _train_config(resolve_paths(parser.parse_args(["train", *argv])))

    mixed = config(
        "--store",
        "sim.zarr",
        "--store",
        "s3://b/real.zarr",
        "--store-weights",
        "0.8,0.2",
        "--init-from",
        "runs/src",
        "--freeze",
        "1",
    )
    assert mixed.data.store is None
    assert [(s.url, s.weight) for s in mixed.data.stores] == [
        (str(tmp_path / "sim.zarr"), 0.8),
        ("s3://b/real.zarr", 0.2),
    ]
    assert mixed.train.init_from == str(tmp_path / "runs/src") and mixed.train.freeze == 1
    assert [s.weight for s in config("--store", "a.zarr", "--store", "b.zarr").data.stores] == [1.0, 1.0]
    single = config("--store", "a.zarr")
    assert single.data.store == str(tmp_path / "a.zarr") and single.data.stores == ()
    with pytest.raises(ConfigError, match="--store-weights gives 1 weights for 2 --store"):
        config("--store", "a.zarr", "--store", "b.zarr", "--store-weights", "1")
