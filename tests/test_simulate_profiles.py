"""The simulator in any survey profile (``lensray simulate --profile``): resampling that conserves flux,
colours and depths from the band's wavelength, and every shipped profile's files opened with astropy at the
profile's path and HDU (shapes, celestial WCS, catalogue)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from lensray.cli import main
from lensray.config import DataConfig, SimulateConfig
from lensray.errors import ConfigError
from lensray.profiles import PROFILES, SurveyProfile
from lensray.simulate.instrument import CANVAS_SIZE, band_observation
from lensray.simulate.render import render_scene
from lensray.simulate.scene import draw_scene
from lensray.simulate.survey import color_weight, observe_survey, overlap_matrix, resample, survey_bands
from lensray.simulate.writer import (
    SURVEY_CATALOG_NAME,
    TRUTH_NAME,
    object_rng,
    simulate_dataset,
    simulate_object,
    write_object,
)
from lensray.sky.bands import BAND_NAMES
from lensray.sky.catalog import load_catalog

NO_QUIRKS = dict(nan_pixel_rate=0.0, offsize_nir_rate=0.0, missing_image_rate=0.0, duplicate_id_rate=0.0)


def _profile(bands: list[dict], path: str = "{band}/{id}.fits") -> SurveyProfile:
    return SurveyProfile(name="test", bands=tuple(bands), reference=bands[0]["name"], path=path)


def test_resampling_is_block_sums_for_integer_ratios_and_conserves_flux_otherwise():
    rng = np.random.default_rng(0)
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE))
    canvas[72:132, 72:132] = rng.random((60, 60))  # all flux within 3" of the centre: inside every footprint
    blocks = canvas[2:202, 2:202].reshape(100, 2, 100, 2).sum(axis=(1, 3))
    assert set(np.unique(overlap_matrix(100, 0.2))) == {0.0, 1.0}  # lsst: whole canvas pixels, 2x2 blocks
    np.testing.assert_allclose(resample(canvas, 100, 0.2), blocks, rtol=1e-14, atol=0)
    np.testing.assert_allclose(resample(canvas, 200, 0.1), canvas[2:202, 2:202], rtol=1e-14, atol=0)  # the canvas
    for size, scale in ((64, 0.168), (119, 0.168), (45, 0.37)):
        assert resample(canvas, size, scale).sum() == pytest.approx(canvas.sum(), rel=1e-12), scale


def test_noise_free_flux_is_the_same_at_every_pixel_scale():
    """One classic scene in three bands at VIS's wavelength on 0.1", 0.168" and 0.3" grids (~20" stamps)."""
    profile = _profile(
        [
            dict(name="a", pixel_scale=0.1, size=200, wavelength_nm=715.0),
            dict(name="b", pixel_scale=0.168, size=119, wavelength_nm=715.0),
            dict(name="c", pixel_scale=0.3, size=66, wavelength_nm=715.0),
        ]
    )
    config = SimulateConfig(preset="classic", companion_rate=0.0, spiral_rate=0.0, **NO_QUIRKS)
    scene = draw_scene(object_rng(3, 200001).spawn(1)[0], True, config)
    bands = survey_bands(profile)
    images = observe_survey(scene, render_scene(scene), bands, [None] * 3, noisy=False).images
    totals = {name: float(image.astype(np.float64).sum()) for name, image in images.items()}
    assert totals["b"] == pytest.approx(totals["a"], rel=2e-3) and totals["c"] == pytest.approx(totals["a"], rel=5e-3)
    assert {name: image.shape for name, image in images.items()} == {"a": (200, 200), "b": (119, 119), "c": (66, 66)}


def test_colour_and_depth_come_from_the_wavelength():
    assert [color_weight(w) for w in (715.0, 1085.0, 1375.0, 1770.0, 2200.0)] == [0.0, 0.55, 0.8, 1.0, 1.0]
    assert -0.6 <= color_weight(368.0) < color_weight(477.0) < 0.0  # bluer than VIS: extrapolated, floored
    assert color_weight(100.0) == -0.6
    vis, h = survey_bands(_profile([dict(name="v", pixel_scale=0.1, size=200, wavelength_nm=715.0)]))[0], None
    assert vis.observation.noise_cps == pytest.approx(band_observation("VIS").noise_cps, rel=1e-12)
    assert vis.observation.zero_point == band_observation("VIS").zero_point
    h = survey_bands(_profile([dict(name="h", pixel_scale=0.1, size=200, wavelength_nm=1770.0)]))[0]
    # H's depth per arcsec, on 0.1" pixels: a third of its 0.3" pixels' sigma
    assert h.observation.noise_cps == pytest.approx(band_observation("H").noise_cps / 3, rel=1e-12)
    assert h.nearest == "H" and vis.nearest == "VIS"


def test_stamps_wider_than_the_canvas_and_compressed_primaries_are_refused(tmp_path):
    wide = _profile([dict(name="w", pixel_scale=0.3, size=80, wavelength_nm=800.0)])
    with pytest.raises(ConfigError, match=r"band w: stamps of 80 px .* wider than"):
        simulate_dataset(SimulateConfig(out=str(tmp_path), n=1), wide)
    primary_fz = _profile([dict(name="f", pixel_scale=0.2, size=50, wavelength_nm=800.0)], "{band}/{id}.fits.fz")
    with pytest.raises(ConfigError, match="never the primary HDU"):
        simulate_dataset(SimulateConfig(out=str(tmp_path), n=1), primary_fz)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_the_challenge_profile_is_the_challenge_simulator():
    config = SimulateConfig(**NO_QUIRKS)
    plain = simulate_object(200001, True, object_rng(4, 200001), config)
    named = simulate_object(200001, True, object_rng(4, 200001), config, PROFILES["euclid_challenge"])
    for band in BAND_NAMES:
        np.testing.assert_array_equal(plain.images[band], named.images[band])
    assert plain.row == named.row


def _fitsverify(path: Path) -> None:
    """NASA's fitsverify on one written file (.ci/run installs Debian's package)."""
    if shutil.which("fitsverify") is None:
        pytest.skip("NASA fitsverify is not installed (apt-get install fitsverify; .ci/run does)")
    result = subprocess.run(["fitsverify", "-q", "-e", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("verification OK"), result.stdout


@pytest.mark.parametrize("name", ["euclid_mer", "hsc", "lsst"])
def test_each_profile_written_in_its_layout_with_wcs_and_catalogue(name, tmp_path, ray_cluster):
    profile = PROFILES[name]
    config = SimulateConfig(out=str(tmp_path), n=4, seed=6, workers=2, **{**NO_QUIRKS, "nan_pixel_rate": 0.5})
    if name == "hsc":  # through the CLI flag once
        quirks = [f"simulate.{key}={value}" for key, value in {**NO_QUIRKS, "nan_pixel_rate": 0.5}.items()]
        flags = ["--out", str(tmp_path), "--n", "4", "--seed", "6", "--workers", "2", "--profile", "hsc"]
        assert main(["simulate", *flags, *(arg for q in quirks for arg in ("--set", q))]) == 0
    else:
        summary = simulate_dataset(config, profile)
        assert f"profile {name}" in str(summary)
    data = DataConfig(profile=name, label_column="is_lens", coord_columns=("ra", "dec"))
    catalog = load_catalog(str(tmp_path / SURVEY_CATALOG_NAME), data)
    table = catalog.table
    assert list(table["ID"]) == [200001, 200002, 200003, 200004]
    written = Table.read(tmp_path / SURVEY_CATALOG_NAME)
    assert written.colnames == ["ID", "ra", "dec", "is_lens", *(f"mag_{b}" for b in profile.band_names)]
    assert written["ra"].unit == "deg" and written["is_lens"].dtype == bool
    assert sorted(table["is_lens"]) == [0, 0, 1, 1] and (tmp_path / TRUTH_NAME).is_file()
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    expected = {profile.relpath(b, i) for b in profile.band_names for i in table["ID"]}
    assert files == expected | {SURVEY_CATALOG_NAME, TRUTH_NAME}
    for object_id, ra, dec in zip(table["ID"], table["ra"], table["dec"], strict=True):
        for band in profile.bands:
            with fits.open(tmp_path / profile.relpath(band.name, object_id)) as hdul:
                hdul.verify("exception")
                hdu = hdul[band.hdu]
                assert hdu.data.shape == (band.size, band.size) and hdu.header["BAND"] == band.name
                assert hdu.header["BUNIT"] == "flux" and hdu.header["PIXSCALE"] == band.pixel_scale
                wcs = WCS(hdu.header)
                assert wcs.has_celestial and wcs.wcs.radesys == "ICRS"
                assert np.allclose(wcs.proj_plane_pixel_scales()[0].to_value("arcsec"), band.pixel_scale, atol=1e-6)
                centre = wcs.pixel_to_world_values((band.size - 1) / 2, (band.size - 1) / 2)
                assert np.allclose(centre, (ra, dec), atol=1e-9, rtol=0)
                if len({profile.relpath(b, 0) for b in profile.band_names}) > 1:  # one band per file
                    assert [h.name for h in hdul][1:] == ["IMAGE", "MASK", "VARIANCE"]
                    assert np.array_equal(hdul["MASK"].data != 0, np.isnan(hdu.data))
                    sky = hdu.header["SKYSIG"]
                    assert np.median(hdul["VARIANCE"].data) == pytest.approx(sky**2, rel=0.05)
                    # the noise on the band's own pixels is the stated sky sigma (border pixels, robust)
                    border = np.concatenate([hdu.data[:6].ravel(), hdu.data[-6:].ravel()])
                    mad = 1.4826 * np.nanmedian(np.abs(border - np.nanmedian(border)))
                    assert 0.5 * sky < mad < 2.0 * sky
    if name == "euclid_mer":
        with fits.open(tmp_path / "200001.fits") as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "VIS", "NIR_Y", "NIR_J", "NIR_H"]
    # the written bytes are the object's, whatever the worker: rewrite one ID in-process and compare
    again = tmp_path / "again"
    obj = simulate_object(200002, bool(table["is_lens"][1]), object_rng(6, 200002), config, profile)
    write_object(obj, str(again), 6, profile)
    for band in profile.band_names:
        relpath = profile.relpath(band, 200002)
        assert (again / relpath).read_bytes() == (tmp_path / relpath).read_bytes(), relpath
    _fitsverify(tmp_path / profile.relpath(profile.band_names[0], 200001))
