from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from lensray.config import (
    ConfigError,
    LensrayConfig,
    dump_config,
    load_config,
    parse_override,
    save_config,
)


def test_defaults_validate_and_are_the_learning_recipe() -> None:
    config = load_config()
    assert config.preprocess.mode == "asinh"
    assert config.model.lastro.block_order == "bn_relu"
    assert config.data.bands == ("VIS", "Y", "J", "H")


def test_yaml_and_overrides_are_applied_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 4\n  batch_size: 16\npreprocess:\n  mode: log\n")
    config = load_config(path, ["train.epochs=7", "data.bands=[VIS]", "model.lastro.pool=2"])
    assert config.train.epochs == 7  # override beats file
    assert config.train.batch_size == 16  # file beats default
    assert config.preprocess.mode == "log"
    assert config.data.bands == ("VIS",)
    assert config.model.lastro.pool == 2


def test_round_trip_through_yaml_is_identical(tmp_path: Path) -> None:
    config = load_config(None, ["preprocess.crop=100", "preprocess.bin=2", "data.bands=[H, VIS]", "model.name=resnet"])
    path = tmp_path / "resolved.yaml"
    save_config(config, path)
    again = load_config(path)
    assert again == config
    assert dump_config(again) == dump_config(config)
    assert again.data.bands == ("VIS", "H")  # canonical band order


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.epochz=3"], "train.epochz"),
        (["nosuchsection.x=1"], "nosuchsection"),
        (["model.lastro.kernal=3"], "model.lastro.kernal"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: unknown key"):
        load_config(None, overrides)


def test_unknown_key_in_yaml_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("preprocess:\n  mdoe: asinh\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert "preprocess.mdoe: unknown key" in str(excinfo.value)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=many", "train.epochs"),
        ("preprocess.mode=sqrt", "preprocess.mode"),
        ("data.bands=[VIS, K]", "data.bands"),
        ("simulate.lens_fraction=1.5", "simulate.lens_fraction"),
        ("preprocess.bin=3", "preprocess"),  # 3 does not divide 200
        ("data.bands=[VIS, VIS]", "data.bands"),
    ],
)
def test_wrong_types_and_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..epochs=3", "train.epochs=[1,"])
def test_malformed_overrides_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_config_is_frozen() -> None:
    config = LensrayConfig()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.train.epochs = 3  # type: ignore[misc]


def test_every_shipped_yaml_config_validates() -> None:
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("*.yaml"))
    assert files, "configs/ holds the run configs"
    files.append(root / "lensray" / "resources" / "demo.yaml")  # the demo's, shipped inside the package
    for path in files:
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("resources.cpus_per_worker=.inf", "resources.cpus_per_worker"),
        ("simulate.lens_fraction=.nan", "simulate.lens_fraction"),
        ("search.reduction_factor=.inf", "search.reduction_factor"),
        ("train.seed=.inf", "train.seed"),
    ],
)
def test_non_finite_numbers_are_rejected_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: .*finite"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=true", "train.epochs"),
        ("optim.lr=true", "optim.lr"),
        ("train.seed=false", "train.seed"),
        ("resources.num_workers=true", "resources.num_workers"),
        ("search.seed=true", "search.seed"),
        ("train.steps_per_epoch=true", "train.steps_per_epoch"),
        ("model.lastro.dense=[true]", "model.lastro.dense"),
        ("model.resnet.widths=[16, true, 64]", "model.resnet.widths"),
        ("preprocess.crop=true", "preprocess.crop"),
    ],
)
def test_booleans_are_not_numbers(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}.*: .*boolean"):
        load_config(None, [override])


def test_a_yaml_file_with_inf_or_a_boolean_count_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: .inf\ntrain:\n  epochs: true\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert str(path) in message and "optim.lr" in message and "train.epochs" in message


def test_numbers_and_switches_still_validate() -> None:
    config = load_config(None, ["optim.lr=1", "train.epochs=5", "train.sanity=false", "preprocess.strict=true"])
    assert config.optim.lr == 1.0 and config.train.epochs == 5 and not config.train.sanity
    assert config.preprocess.strict and config.resources.use_gpu is False


PATH_KEYS = (
    "data.images",
    "data.catalog",
    "data.store",
    "preprocess.out",
    "simulate.out",
    "train.out",
    "search.storage",
)


def test_local_paths_become_absolute_and_urls_stay_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, [f"{key}=rel/{key}" for key in PATH_KEYS])
    for key in PATH_KEYS:
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) == str(tmp_path / "rel" / key), key
    home = load_config(None, ["train.out=~/runs"]).train.out
    assert home == str(Path("~/runs").expanduser())
    for url in ("s3://bucket/runs", "gs://bucket/runs", "https://example.org/runs", "file:///abs/runs"):
        config = load_config(None, [f"{key}={url}" for key in PATH_KEYS])
        assert all(getattr(getattr(config, k.split(".")[0]), k.split(".")[1]) == url for k in PATH_KEYS), url


def test_relative_paths_in_a_config_file_resolve_against_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "configs" / "run.yaml"
    path.parent.mkdir()
    path.write_text("data:\n  store: store.zarr\ntrain:\n  out: runs\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = load_config(path)
    assert config.data.store == str(work / "store.zarr") and config.train.out == str(work / "runs")
