"""The evaluation report and the candidate gallery render in a real browser (headless Chromium):
a screenshot that is not blank, and every embedded image decoded (the page's own load check).

Chromium comes from Debian: ``apt-get install -y chromium``. Without it the test is skipped, unless
``CI`` is set (CI installs it, so there a missing browser is a failure).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from tiny_run import tiny_run_config

from lensray import storage
from lensray.config import DataConfig, PreprocessConfig, SimulateConfig
from lensray.evaluate.evaluate import evaluate_run
from lensray.evaluate.score import score_catalog
from lensray.ingest.ingest import ingest
from lensray.ingest.store import LensStore
from lensray.simulate.writer import simulate_dataset
from lensray.sky.catalog import CATALOG_NAME
from lensray.train.trainer import train

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("CI is set but no Chromium was found: `apt-get install -y chromium`")
    pytest.skip("headless Chromium is not installed (apt-get install -y chromium); CI installs it")


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def assert_renders(browser: str, page: Path, work: Path, min_images: int) -> None:
    # --virtual-time-budget lets the load event fire and the page's check run before the DOM is dumped.
    dom = _chromium(browser, work / "profile-dom", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, f"{page.name}: the load check never ran (no data-images-loaded in the DOM)"
    ok, total = map(int, loaded.groups())
    assert total >= min_images and ok == total, f"{page.name}: {ok} of {total} images loaded"

    shot = work / f"{page.stem}.png"
    _chromium(browser, work / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 0.05, f"{page.name}: the screenshot is blank"
    # Figures, not just text: many distinct grey levels (anti-aliased text alone has far fewer rows of them).
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


@pytest.mark.slow
def test_report_and_candidate_gallery_render_in_chromium(tmp_path: Path, ray_cluster: None) -> None:
    browser = _browser()
    raw = str(tmp_path / "raw")
    simulate_dataset(
        SimulateConfig(
            out=raw,
            n=24,
            seed=4,
            nan_pixel_rate=0.0,
            offsize_nir_rate=0.0,
            missing_image_rate=0.0,
            duplicate_id_rate=0.0,
            workers=2,
        )
    )
    store_url = str(tmp_path / "store.zarr")
    data = DataConfig(images=raw, catalog=storage.join(raw, CATALOG_NAME), bands=("VIS", "Y", "J", "H"))
    ingest(
        data,
        PreprocessConfig(
            out=store_url, crop=40, bin=2, shard_size=8, val_fraction=0.3, test_fraction=0.3, split_seed=1
        ),
        progress=False,
    )
    store = LensStore.open(store_url)
    for split in ("val", "test"):
        assert len(set(store.labels[store.indices(split)].tolist())) == 2, f"the test needs both classes in {split}"
    config = tiny_run_config(store_url, tmp_path / "runs", "browser")
    checkpoint = train(config).best_checkpoint

    report = evaluate_run(checkpoint, store_url, tmp_path / "report", gallery=4)
    scored = score_catalog(
        checkpoint, raw, storage.join(raw, CATALOG_NAME), str(tmp_path / "cand.parquet"), device="cpu", gallery=12
    )
    assert_renders(browser, Path(report.html_path), tmp_path, min_images=5)
    assert_renders(browser, Path(scored.gallery_path), tmp_path, min_images=1)
