"""The smallest LASTRO run that trains end to end in seconds: for tests that need a real checkpoint of
a store built from simulated FITS (scoring, the browser-rendered report), not a model that learns."""

from __future__ import annotations

from pathlib import Path

from lensray.config import LensrayConfig, load_config

LASTRO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lastro.yaml"


def tiny_run_config(store_url: str, runs: str | Path, name: str) -> LensrayConfig:
    """One epoch of two batches of 8, one conv pair of 4 filters, no sanity check."""
    return load_config(
        LASTRO_CONFIG,
        [
            f"data.store={store_url}",
            f"train.out={runs}",
            f"train.name={name}",
            "train.epochs=1",
            "train.steps_per_epoch=2",
            "train.batch_size=8",
            "train.sanity=false",
            "model.lastro.dense=[8]",
            "model.lastro.filters=4",
            "model.lastro.pairs=1",
        ],
    )
