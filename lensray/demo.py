"""``lensray demo``: the whole chain on a small simulated set, locally, sized for 2 CPU cores."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from lensray import storage
from lensray.config import LensrayConfig, save_config
from lensray.evaluate.compare import compare_runs
from lensray.evaluate.evaluate import evaluate_run
from lensray.evaluate.report import preview_grid
from lensray.ingest.ingest import ingest
from lensray.ingest.preprocess import preprocess_cutout
from lensray.ingest.store import LensStore
from lensray.runs import load_best
from lensray.simulate.writer import simulate_dataset
from lensray.sky.bands import BANDS, VIS_PIXEL_SCALE
from lensray.sky.catalog import CATALOG_NAME, Catalog, apply_label_rule, label_counts, read_catalog
from lensray.sky.fits import read_cutouts
from lensray.train.trainer import train
from lensray.train.tune import run_search

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_SEARCH = Path(__file__).resolve().parents[1] / "tune_configs" / "demo.yaml"
PREVIEW_PER_CLASS = 4


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(config: LensrayConfig, out: str | Path) -> dict[str, Path]:
    """Run every stage; returns the paths of what it wrote."""

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(out / "data")
    store_url = str(out / "store.zarr")
    runs = out / "runs"
    experiments = out / "tune"  # notebooks/load_best.ipynb reads demo_output/tune/demo-search by default
    for folder in (runs, experiments, out / "compare", out / "evaluation"):
        if folder.exists():  # the demo owns its folder: each run trains and searches afresh
            shutil.rmtree(folder)
    config = config.model_copy(
        update={
            "simulate": config.simulate.model_copy(update={"out": data_root}),
            "data": config.data.model_copy(
                update={"images": data_root, "catalog": storage.join(data_root, CATALOG_NAME), "store": store_url}
            ),
            "preprocess": config.preprocess.model_copy(update={"out": store_url}),
            "train": config.train.model_copy(update={"out": str(runs), "name": "demo-lastro"}),
        }
    )
    save_config(config, out / "config.yaml")
    started = time.perf_counter()

    _step(f"1. simulate {config.simulate.n} challenge-format objects -> {data_root}")
    print(simulate_dataset(config.simulate))

    _step("2. catalogue and label rules")
    catalog = read_catalog(config.data.catalog)
    for rule in ("paper", "official", "challenge"):
        print(f"  {rule:9s} {label_counts(apply_label_rule(catalog, rule))}")

    _step("3. preview of each preprocessing mode")
    preview = write_preview(config, catalog, out / "preview.png")
    print(f"  preview grid: {preview}")

    _step(f"4. ingest into a Zarr store with Ray Data -> {store_url}")
    print(ingest(config.data, config.preprocess))
    print(LensStore.open(store_url).info())

    _step(
        f"5. train {config.model.name.upper()} with Ray Train ({config.resources.num_workers} CPU worker(s), DDP/gloo)"
    )
    outcome = train(config)
    print(outcome)

    _step(f"6. Ray Tune search with ASHA early stopping ({DEMO_SEARCH.relative_to(DEMO_SEARCH.parents[1])})")
    search = run_search(DEMO_SEARCH, storage=str(experiments), store=store_url)
    print(search)
    best = load_best(search.experiment_url)
    print(
        f"  load_best: trial {best.info['trial_id']} {best.info['params']} val_auc {best.info['value']:.3f}"
        f" -> {best.checkpoint_url}"
    )

    _step("7. compare every demo run on the test split (the study's Table I, for these runs)")
    runs_compared, names = [outcome.run_url], [f"{outcome.run_url.rsplit('/', 1)[-1]} (step 5)"]
    for _, trial in search.summary.table.iterrows():
        if isinstance(trial.get("run_url"), str):  # a trial that reported no epoch has nothing to compare
            knobs = ", ".join(
                f"{key.rsplit('.', 1)[-1]}={trial[key]:g}"
                if isinstance(trial[key], float)
                else f"{key.rsplit('.', 1)[-1]}={trial[key]}"
                for key in best.info["params"]
            )
            names.append(f"trial {trial['trial_id']} ({knobs})")
            runs_compared.append(trial["run_url"])
    table = compare_runs(runs_compared, out / "compare", names=names)
    print(table)

    _step("8. evaluate the best trial on the test split")
    report = evaluate_run(best.checkpoint_url, store_url, out / "evaluation", split="test", appendix=table.html_blocks)
    print(report)

    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs in {out}")
    print(f"HTML report: {report.html_path}")
    return {
        "preview": preview,
        "store": Path(store_url),
        "config": out / "config.yaml",
        "run": Path(outcome.run_url),
        "experiment": Path(search.experiment_url),
        "comparison": Path(table.html_path),
        "report": Path(report.html_path),
    }


def _preview_picks(catalog: Catalog, rule: str) -> list[tuple[int, str]]:
    """Lenses from strong to weak (by lensed-source pixels) and non-lenses with and without companions."""
    labelled = apply_label_rule(catalog, rule)
    table = catalog.table.set_index("ID").loc[labelled.ids]
    lenses = table[labelled.labels == 1].sort_values("n_pix_source", ascending=False)
    # Two of the strongest, then weaker ones; spare candidates stand in for rows without images.
    ranks = np.unique([0, 1, 2, 3, len(lenses) // 4, len(lenses) // 4 + 1, len(lenses) // 2, len(lenses) // 2 + 1])
    ranks = ranks[ranks < len(lenses)]
    picks = [(int(i), f"lens {int(i)} mu={lenses.loc[i, 'mag_eff']:.1f}") for i in lenses.index[ranks]]
    non_lenses = table[labelled.labels == 0]
    crowded = non_lenses[non_lenses["n_gal_5"] > 0].index[:PREVIEW_PER_CLASS]
    plain = non_lenses.drop(index=crowded).index[:PREVIEW_PER_CLASS]
    picks += [(int(i), f"non-lens {int(i)} ngal5={int(non_lenses.loc[i, 'n_gal_5'])}") for i in [*crowded, *plain]]
    return picks


def write_preview(config: LensrayConfig, catalog: Catalog, out_path: Path) -> Path:
    """Raw / asinh / log / clip per band for lenses (strong to weak) and non-lenses, on the store's crop."""
    picks = _preview_picks(catalog, config.data.labels)
    cutouts, _ = read_cutouts(config.data.images, [i for i, _ in picks], config.data.bands, "zero")
    by_id = {c.object_id: c for c in cutouts}
    view = config.preprocess.model_copy(update={"bin": 1, "dtype": "float32"})
    crop = config.preprocess.crop
    rows = []
    lenses = [p for p in picks if p[0] in by_id and p[1].startswith("lens")]
    non_lenses = [p for p in picks if p[0] in by_id and p[1].startswith("non-lens")]
    half = PREVIEW_PER_CLASS // 2
    chosen = [*lenses[:half], *lenses[-half:], *non_lenses[:half], *non_lenses[-half:]]
    for object_id, label in chosen:
        bands = by_id[object_id].bands
        content: dict[str, np.ndarray] = {f"raw:{b}": _central(bands[b], crop, b) for b in config.data.bands}
        for mode in ("asinh", "log", "clip"):
            content[mode] = preprocess_cutout(bands, view.model_copy(update={"mode": mode}), config.data.bands)
        rows.append((label, content))
    return preview_grid(
        rows, config.data.bands, out_path, title="lensray demo: lenses, strong to weak (top) vs non-lenses (bottom)"
    )


def _central(image: np.ndarray, crop_vis_px: int | None, band: str) -> np.ndarray:
    """The raw stamp's central region matching a VIS-pixel crop, at the band's own pixel scale."""
    if crop_vis_px is None:
        return image
    side = max(1, round(crop_vis_px * VIS_PIXEL_SCALE / BANDS[band].pixel_scale))
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return image[top : top + side, left : left + side]
