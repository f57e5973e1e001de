"""The challenge-format simulator: physics and catalogue on a pure sample, layout and quirks on real
written data sets (local disk and moto S3) through real Ray tasks."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from lensray import storage
from lensray.config import SimulateConfig
from lensray.simulate.instrument import FLUX_MAGZP, band_observation
from lensray.simulate.measure import FIELD_DESCRIPTIONS
from lensray.simulate.writer import object_rng, simulate_dataset, simulate_object
from lensray.sky.bands import BAND_NAMES, BANDS, NIR_BANDS, band_relpath
from lensray.sky.catalog import CATALOG_NAME, COLUMNS

NO_QUIRKS = dict(nan_pixel_rate=0.0, offsize_nir_rate=0.0, missing_image_rate=0.0, duplicate_id_rate=0.0)
SOURCE_COLUMNS = (
    "source_ID",
    "z_source",
    "mag_source",
    "r_source",
    "n_pix_source",
    "source_flux",
    "n_source_im",
    "mag_eff",
    "sb_contrast",
    "color_diff",
)


@pytest.fixture(scope="module")
def sample():
    """240 objects, half lenses, simulated in-process (no I/O): the population the label rules see."""
    config = SimulateConfig(**NO_QUIRKS)
    return [simulate_object(300000 + k, k % 2 == 0, object_rng(11, 300000 + k), config) for k in range(240)]


def _lens_ids(rows: list[dict]) -> dict[str, set[int]]:
    """IDs labelled lens under each rule, as the README's "Data contracts" states them (official also excludes some)."""
    return {
        "paper": {r["ID"] for r in rows if r["n_sources"] > 0},
        "official": {r["ID"] for r in rows if r["mag_eff"] > 2},
        "challenge": {r["ID"] for r in rows if r["n_source_im"] > 0 and r["mag_eff"] > 1.6 and r["n_pix_source"] > 20},
    }


# --- pure: one object ---------------------------------------------------------------------------------


def test_same_seed_same_object_and_different_seed_differs():
    config = SimulateConfig(**NO_QUIRKS)
    first = simulate_object(200001, True, object_rng(7, 200001), config)
    again = simulate_object(200001, True, object_rng(7, 200001), config)
    other = simulate_object(200001, True, object_rng(8, 200001), config)
    for band in BAND_NAMES:
        np.testing.assert_array_equal(first.images[band], again.images[band])
    assert first.row == again.row
    assert not np.array_equal(first.images["VIS"], other.images["VIS"])
    assert first.row["mag_eff"] != other.row["mag_eff"]


def test_shapes_dtype_and_raw_flux_scale(sample):
    for obj in sample[:20]:
        for band in BAND_NAMES:
            image = obj.images[band]
            assert image.shape == (BANDS[band].size, BANDS[band].size), (obj.object_id, band)
            assert image.dtype == np.float32
            assert np.isfinite(image).all()
        vis = obj.images["VIS"]
        noise = 1.4826 * np.median(np.abs(vis[:10] - np.median(vis[:10])))
        assert 5e-14 < noise < 1e-12, obj.object_id  # the challenge's raw scale
        assert 1e-12 < vis.max() < 1e-8, obj.object_id
        expected = band_observation("VIS").noise_cps * band_observation("VIS").flux_per_cps
        assert noise == pytest.approx(expected, rel=0.15)


def test_catalogue_fluxes_and_magnitudes_match_the_images(sample):
    """Catalogue bookkeeping against pixels: the VIS stamp's flux is the lens + source flux (objects
    without companions), and mag_lens is the lens flux's magnitude."""
    checked = 0
    for obj in sample:
        row = obj.row
        if row["n_gal_10"]:
            continue
        vis = obj.images["VIS"].astype(np.float64)
        sigma = band_observation("VIS").noise_cps * band_observation("VIS").flux_per_cps
        expected = row["lens_flux"] + row["source_flux"]
        tolerance = 6 * sigma * math.sqrt(vis.size) + 0.02 * expected
        assert vis.sum() == pytest.approx(expected, abs=tolerance), obj.object_id
        assert -2.5 * math.log10(row["lens_flux"]) + FLUX_MAGZP == pytest.approx(row["mag_lens"], abs=0.1)
        checked += 1
    assert checked > 50


def test_nir_and_vis_show_the_same_field(sample):
    """NIR stamps are 3x3 blocks of the VIS field: the lens light's centroid agrees to a fraction of a pixel."""
    bright = sorted(
        (o for o in sample if o.kind == "elliptical" and not o.row["n_gal_10"] and not o.is_lens),
        key=lambda o: o.row["mag_lens"],
    )[:5]
    assert bright
    for obj in bright:
        centroids = {}
        for band in ("VIS", "H"):
            image = np.clip(obj.images[band].astype(np.float64), 0, None)
            rows, cols = np.indices(image.shape)
            scale = BANDS[band].pixel_scale
            centre = (image.shape[0] - 1) / 2
            centroids[band] = np.array([(cols * image).sum(), (rows * image).sum()]) / image.sum() - centre
            centroids[band] *= scale
        assert np.abs(centroids["VIS"] - centroids["H"]).max() < 0.06, obj.object_id


def test_all_columns_present_and_plausible(sample):
    assert tuple(FIELD_DESCRIPTIONS) == COLUMNS
    for obj in sample:
        row = obj.row
        assert tuple(row) == COLUMNS
        assert all(np.isfinite(v) for v in row.values())
        assert 0.2 <= row["z_lens"] <= 0.9
        assert math.pi * 0.3**2 * 0.99 < row["ein_area"] < math.pi * 2.0**2 * 1.01
        assert 16 < row["mag_lens"] < 26 and row["halo_mass"] > row["star_mass"] > 1e9
        assert 0 <= row["x_crit"] < 200 and 0 <= row["y_crit"] < 200
        assert row["n_gal_3"] <= row["n_gal_5"] <= row["n_gal_10"]
        assert row["n_pix_lens"] > 0 and row["lens_flux"] > 0
        if obj.is_lens:
            assert row["n_sources"] == 1 and row["source_ID"] > 0
            assert row["z_source"] > row["z_lens"] and 23 <= row["mag_source"] <= 27.5
            assert row["mag_eff"] > 1.0 and row["source_flux"] > 0 and row["r_source"] > 0
            assert row["n_crit"] >= 1 and row["crit_area"] > 0
        else:
            assert row["n_sources"] == 0
            assert all(row[c] == 0 for c in SOURCE_COLUMNS), obj.object_id


def test_mag_eff_spans_weak_to_strong_and_sources_are_bluer(sample):
    lenses = [o.row for o in sample if o.is_lens]
    mag_eff = np.array([r["mag_eff"] for r in lenses])
    assert (mag_eff < 1.2).sum() >= 3, np.sort(mag_eff)[:10]  # weak: barely magnified
    assert (mag_eff > 10).sum() >= 2, np.sort(mag_eff)[-10:]  # strong
    assert 0.2 < np.mean(mag_eff > 2) < 0.8
    assert sum(r["n_pix_source"] <= 20 for r in lenses) >= 3  # some are barely visible
    strong = [r for r in lenses if r["mag_eff"] > 4]
    assert strong and np.mean([r["n_source_im"] >= 2 for r in strong]) > 0.7
    assert np.mean([r["color_diff"] > 0 for r in lenses]) > 0.9


def test_label_rules_really_differ(sample):
    rows = [o.row for o in sample]
    lenses = _lens_ids(rows)
    assert len(lenses["paper"]) == 120
    assert lenses["official"] < lenses["paper"] and lenses["challenge"] < lenses["paper"]
    # Neither strict rule contains the other: faint but magnified vs visible but barely magnified.
    assert lenses["official"] - lenses["challenge"] and lenses["challenge"] - lenses["official"]
    assert 20 < len(lenses["challenge"]) < 110 and 20 < len(lenses["official"]) < 110
    official_non = [r for r in rows if r["n_sources"] == 0 or r["mag_eff"] < 1.2]
    excluded = len(rows) - len(lenses["official"]) - len(official_non)
    assert len(official_non) > 125 and excluded > 5  # weak lenses count as non-lenses; 1.2-2 are dropped


def test_hard_non_lenses_are_drawn_at_their_rates():
    config = SimulateConfig(spiral_rate=1.0, companion_rate=1.0, **NO_QUIRKS)
    objs = [simulate_object(400000 + k, False, object_rng(3, 400000 + k), config) for k in range(10)]
    assert {o.kind for o in objs} == {"spiral", "ring"}
    assert all(o.row["n_gal_10"] >= 1 for o in objs)
    lens = simulate_object(400100, True, object_rng(3, 400100), config)
    assert lens.kind == "elliptical" and lens.row["n_gal_10"] >= 1  # companions in both classes
    none = SimulateConfig(spiral_rate=0.0, companion_rate=0.0, **NO_QUIRKS)
    plain = [simulate_object(400000 + k, False, object_rng(3, 400000 + k), none) for k in range(5)]
    assert all(o.kind == "elliptical" and o.row["n_gal_10"] == 0 for o in plain)


def test_image_quirks_at_rate_one_do_what_they_claim():
    config = SimulateConfig(**{**NO_QUIRKS, "nan_pixel_rate": 1.0, "offsize_nir_rate": 1.0})
    for k in range(6):
        obj = simulate_object(500000 + k, k % 2 == 0, object_rng(0, 500000 + k), config)
        assert obj.quirks.nan_pixels, obj.object_id
        for band in BAND_NAMES:
            assert int(np.isnan(obj.images[band]).sum()) == obj.quirks.nan_pixels.get(band, 0)
        ((band, size),) = obj.quirks.nir_sizes.items()
        assert band in NIR_BANDS and size in (65, 67)
        assert obj.images[band].shape == (size, size)
        assert all(obj.images[b].shape == (66, 66) for b in NIR_BANDS if b != band)


# --- written data sets (real Ray tasks) ---------------------------------------------------------------


def _read_fits(url: str) -> tuple[np.ndarray, fits.Header]:
    with fits.open(io.BytesIO(storage.read_bytes(url))) as hdul:
        return hdul[0].data, hdul[0].header


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_layout_headers_catalogue_and_worker_invariance(tmp_path, ray_cluster):
    config = SimulateConfig(out=str(tmp_path / "w1"), n=8, seed=5, workers=1, **NO_QUIRKS)
    summary = simulate_dataset(config)
    simulate_dataset(config.model_copy(update={"out": str(tmp_path / "w2"), "workers": 2}))
    assert (summary.n_objects, summary.n_lenses, summary.n_rows) == (8, 4, 8)
    assert "8 objects" in str(summary)

    one, two = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert len(one) == 8 * 4 + 1
    assert one == two  # byte for byte, whatever the number of workers

    for object_id in range(200001, 200009):
        for band in BAND_NAMES:
            data, header = _read_fits(str(tmp_path / "w1" / band_relpath(band, object_id)))
            assert data.shape == (BANDS[band].size,) * 2 and data.dtype == np.dtype(">f4")
            assert header["BAND"] == band and header["ID"] == object_id
            assert header["PIXSCALE"] == BANDS[band].pixel_scale and header["MAGZP"] == FLUX_MAGZP

    text = (tmp_path / "w1" / CATALOG_NAME).read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert all(any(line.startswith(f"#   {name}:") for line in comments) for name in COLUMNS)
    table = pd.read_csv(tmp_path / "w1" / CATALOG_NAME, comment="#")
    assert len(table.columns) == 27 and table.columns[0].startswith("Unnamed") and tuple(table.columns[1:]) == COLUMNS
    assert table["ID"].tolist() == list(range(200001, 200009))
    assert table.iloc[:, 0].tolist() == list(range(8))
    assert (table["n_sources"] > 0).sum() == 4


def test_missing_images_and_duplicate_rows_at_rate_one(tmp_path, ray_cluster):
    config = SimulateConfig(
        out=str(tmp_path), n=3, seed=2, workers=2, **{**NO_QUIRKS, "missing_image_rate": 1.0, "duplicate_id_rate": 1.0}
    )
    summary = simulate_dataset(config)
    assert summary.missing_image_ids == summary.duplicate_ids == (200001, 200002, 200003)
    assert not list(tmp_path.rglob("*.fits"))
    table = pd.read_csv(tmp_path / CATALOG_NAME, comment="#")
    assert table["ID"].tolist() == [200001, 200002, 200003, 200001, 200002, 200003]
    assert summary.n_rows == 6
    # A repeated row repeats the original's values.
    pd.testing.assert_frame_equal(table.iloc[3:, 1:].reset_index(drop=True), table.iloc[:3, 1:].reset_index(drop=True))


def test_writes_to_s3_with_nan_and_offsize_quirks(s3_bucket, ray_cluster):
    out = f"{s3_bucket}/challenge/train"
    config = SimulateConfig(
        out=out, n=3, seed=9, workers=2, **{**NO_QUIRKS, "nan_pixel_rate": 1.0, "offsize_nir_rate": 1.0}
    )
    summary = simulate_dataset(config)
    assert summary.catalog_url == f"{out}/{CATALOG_NAME}"
    assert summary.nan_pixel_ids == summary.offsize_nir_ids == (200001, 200002, 200003)
    table = pd.read_csv(io.BytesIO(storage.read_bytes(summary.catalog_url)), comment="#")
    assert table["ID"].tolist() == [200001, 200002, 200003]
    for object_id in summary.nan_pixel_ids:
        images = {band: _read_fits(storage.join(out, band_relpath(band, object_id)))[0] for band in BAND_NAMES}
        assert any(np.isnan(image).any() for image in images.values())
        assert sorted(image.shape[0] for band, image in images.items() if band != "VIS") in ([65, 66, 66], [66, 66, 67])


def test_missing_out_is_a_clear_error():
    with pytest.raises(ValueError, match="simulate.out"):
        simulate_dataset(SimulateConfig(n=1))
