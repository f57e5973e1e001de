"""Survey profiles through reading, preprocessing and the store: real FITS files in each shipped profile's
layout (written here with astropy, TAN WCS headers, no simulator), read back and put on the reference grid.

A point source at one sky position is drawn into every band where that band's WCS puts it; after
preprocessing it must sit on the same pixel of every channel: through the WCS path (reproject) for a band
whose WCS is shifted by a few pixels, through the pixel-scale path when a header has no WCS.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from lensray.config import DataConfig, ModelConfig, PreprocessConfig
from lensray.errors import ConfigError, ScoreError
from lensray.evaluate.inference import checkpoint_input
from lensray.ingest.preprocess import describe, output_shape, preprocess_cutouts
from lensray.ingest.store import LensStore
from lensray.models import build_model, input_pixel_scale
from lensray.profiles import PROFILES, SurveyProfile, recorded_profile
from lensray.sky.fits import CutoutError, read_cutout, read_cutouts

RA0, DEC0 = 150.0, 2.0  # the stamps' centre
SOURCE = (RA0 + 0.83 / 3600 / np.cos(np.radians(DEC0)), DEC0 - 0.47 / 3600)  # off-centre, off pixel edges
FLOAT = PreprocessConfig(dtype="float32")


def _wcs(side: int, scale: float, shift: tuple[float, float] = (0.0, 0.0)) -> WCS:
    """A TAN WCS centred on (RA0, DEC0) at the stamp centre, moved by ``shift`` pixels (x, y)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [RA0, DEC0]
    wcs.wcs.crpix = [(side + 1) / 2 + shift[0], (side + 1) / 2 + shift[1]]
    wcs.wcs.cdelt = [-scale / 3600, scale / 3600]
    return wcs


def _stamp(side: int, scale: float, wcs: WCS, seed: int) -> np.ndarray:
    """Faint noise plus a bright Gaussian (FWHM 0.5") at the sky position SOURCE, placed by ``wcs``."""
    x0, y0 = wcs.world_to_pixel_values(*SOURCE)
    y, x = np.mgrid[:side, :side]
    sigma = 0.5 / 2.355 / scale
    noise = np.random.default_rng(seed).normal(0.0, 0.01, (side, side))
    return (noise + np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))).astype(np.float32)


def _band_hdu(profile: SurveyProfile, band: str, object_id: int, shift=(0.0, 0.0), with_wcs=True, side=None):
    spec = profile.band(band)
    side = side or spec.size
    wcs = _wcs(side, spec.pixel_scale, shift)
    header = wcs.to_header() if with_wcs else fits.Header()
    return _stamp(side, spec.pixel_scale, wcs, object_id * 10 + len(band)), header


def _write(path: Path, hdul: fits.HDUList, *, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    hdul.writeto(buffer)
    path.write_bytes(gzip.compress(buffer.getvalue()) if gz else buffer.getvalue())


def write_mer(root: Path, object_id: int, *, shifted: str | None = None, drop: str | None = None) -> None:
    """euclid_mer: one MEF per object, an EXTNAME per band; band ``shifted``'s WCS moved by (3, -2) px."""
    profile = PROFILES["euclid_mer"]
    hdus = [fits.PrimaryHDU()]
    for spec in profile.bands:
        if spec.hdu == drop:
            continue
        image, header = _band_hdu(profile, spec.name, object_id, (3.0, -2.0) if spec.name == shifted else (0, 0))
        hdus.append(fits.ImageHDU(image, header=header, name=str(spec.hdu)))
    _write(root / profile.relpath("VIS", object_id), fits.HDUList(hdus))


def write_hsc(root: Path, object_id: int, *, no_wcs: str | None = None, side: dict | None = None) -> None:
    """hsc: a file per band, IMAGE + MASK + VARIANCE; band z gzip-compressed; band ``no_wcs`` without WCS."""
    profile = PROFILES["hsc"]
    for spec in profile.bands:
        image, header = _band_hdu(
            profile, spec.name, object_id, with_wcs=spec.name != no_wcs, side=(side or {}).get(spec.name)
        )
        hdul = fits.HDUList(
            [
                fits.PrimaryHDU(),
                fits.ImageHDU(image, header=header, name="IMAGE"),
                fits.ImageHDU(np.zeros(image.shape, np.int32), name="MASK"),
                fits.ImageHDU(np.full(image.shape, 1e-4, np.float32), name="VARIANCE"),
            ]
        )
        _write(root / profile.relpath(spec.name, object_id), hdul, gz=spec.name == "z")


def write_lsst(root: Path, object_id: int, *, skip: str | None = None) -> None:
    """lsst: fpack-style tile-compressed files (CompImageHDU in HDU 1), a file per band."""
    profile = PROFILES["lsst"]
    for spec in profile.bands:
        if spec.name == skip:
            continue
        image, header = _band_hdu(profile, spec.name, object_id)
        compressed = fits.CompImageHDU(image, header=header, compression_type="GZIP_2", quantize_level=0.0)
        _write(root / profile.relpath(spec.name, object_id), fits.HDUList([fits.PrimaryHDU(), compressed]))


def write_challenge(root: Path, object_id: int, *, shifted: str | None = None, with_wcs: bool = True) -> None:
    """euclid_challenge: a file per band, image in HDU 0; NIR on its own 0.3" grid."""
    profile = PROFILES["euclid_challenge"]
    for spec in profile.bands:
        shift = (2.0, 1.0) if spec.name == shifted else (0.0, 0.0)
        image, header = _band_hdu(profile, spec.name, object_id, shift, with_wcs=with_wcs)
        _write(root / profile.relpath(spec.name, object_id), fits.HDUList([fits.PrimaryHDU(image, header=header)]))


def _source_pixels(images: np.ndarray) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in np.unravel_index(np.argmax(channel), channel.shape)) for channel in images]


def _expected_pixel(profile: SurveyProfile) -> tuple[int, int]:
    reference = profile.reference_band
    x, y = _wcs(reference.size, reference.pixel_scale).world_to_pixel_values(*SOURCE)
    return int(np.round(y)), int(np.round(x))


def _prepare(root: Path, profile: SurveyProfile, ids: list[int], config: PreprocessConfig = FLOAT) -> np.ndarray:
    cutouts, rejects = read_cutouts(str(root), ids, profile.band_names, profile=profile)
    assert not rejects, rejects
    prepared = preprocess_cutouts(cutouts, config, profile=profile)
    assert prepared.accepted.all(), prepared.rejects
    return prepared.images


@pytest.mark.parametrize(
    ("name", "writer", "options"),
    [
        ("euclid_mer", write_mer, {"shifted": "Y"}),  # the WCS path puts the shifted band back
        ("hsc", write_hsc, {"no_wcs": "r"}),  # no WCS: the pixel-scale path (same grid: a crop)
        ("lsst", write_lsst, {}),
        ("euclid_challenge", write_challenge, {"shifted": "J"}),  # NIR at 0.3" by WCS
    ],
)
def test_every_profile_reads_its_layout_and_lands_a_source_on_one_pixel(
    tmp_path: Path, name: str, writer, options: dict
) -> None:
    profile = PROFILES[name]
    for object_id in (11, 12):
        writer(tmp_path, object_id, **options)
    images = _prepare(tmp_path, profile, [11, 12])
    side = profile.reference_band.size
    assert images.shape == (2, len(profile.bands), side, side)
    expected = _expected_pixel(profile)
    for stack in images:
        for pixel in _source_pixels(stack):
            assert abs(pixel[0] - expected[0]) <= 1 and abs(pixel[1] - expected[1]) <= 1, (name, pixel, expected)
    cutout = read_cutout(str(tmp_path), 11, profile.band_names, profile=profile)
    assert all(isinstance(cutout.wcs[b], WCS) for b in profile.band_names if b != options.get("no_wcs"))


def test_a_shifted_band_is_off_without_its_wcs_and_back_with_it(tmp_path: Path) -> None:
    """The shift is real: the same files read with the WCS dropped put the source 3 px away in that band."""
    profile = PROFILES["euclid_mer"]
    write_mer(tmp_path, 5, shifted="Y")
    cutout = read_cutout(str(tmp_path), 5, profile.band_names, profile=profile)
    with_wcs = preprocess_cutouts([cutout], FLOAT, profile=profile).images[0]
    blind = type(cutout)(cutout.object_id, cutout.bands, cutout.nan_pixels, {})
    without = preprocess_cutouts([blind], FLOAT, profile=profile).images[0]
    y = profile.band_names.index("Y")
    assert _source_pixels(with_wcs)[y] == _source_pixels(with_wcs)[0]
    assert _source_pixels(without)[y][1] == _source_pixels(without)[0][1] + 3


def test_a_centred_wcs_keeps_the_challenge_path_bit_for_bit(tmp_path: Path) -> None:
    """Challenge files whose WCS agrees with the centred grids preprocess exactly as files without WCS."""
    write_challenge(tmp_path / "wcs", 7)
    write_challenge(tmp_path / "plain", 7, with_wcs=False)
    profile = PROFILES["euclid_challenge"]
    config = PreprocessConfig(crop=100, bin=2)
    with_wcs = _prepare(tmp_path / "wcs", profile, [7], config)
    plain = _prepare(tmp_path / "plain", profile, [7], config)
    assert with_wcs.tobytes() == plain.tobytes()


def test_reading_errors_name_the_object_band_file_and_hdu(tmp_path: Path) -> None:
    mer, hsc, lsst = PROFILES["euclid_mer"], PROFILES["hsc"], PROFILES["lsst"]
    write_mer(tmp_path / "mer", 3, drop="NIR_J")
    with pytest.raises(CutoutError, match=r"no HDU 'NIR_J' \(HDUs: PRIMARY, VIS, NIR_Y, NIR_H\)") as err:
        read_cutout(str(tmp_path / "mer"), 3, mer.band_names, profile=mer)
    assert (err.value.reason, err.value.object_id, err.value.band) == ("hdu", 3, "J")
    assert err.value.url.endswith("mer/3.fits") and "ID 3 band J" in str(err.value)

    write_hsc(tmp_path / "hsc", 4, side={"g": 60})
    with pytest.raises(CutoutError, match=r"stamp is \(60, 60\), expected \(64, 64\)") as err:
        read_cutout(str(tmp_path / "hsc"), 4, hsc.band_names, profile=hsc)
    assert (err.value.reason, err.value.band) == ("shape", "g") and err.value.url.endswith("4/HSC-G.fits")

    write_lsst(tmp_path / "lsst", 6, skip="u")
    cutouts, rejects = read_cutouts(str(tmp_path / "lsst"), [6], lsst.band_names, profile=lsst)
    assert cutouts == [] and [r.reason for r in rejects] == ["missing"]
    assert "ID 6 band u" in rejects[0].message and "u/6.fits.fz" in rejects[0].message


def test_an_hsc_store_records_its_profile(tmp_path: Path, ray_cluster: None) -> None:
    from lensray.ingest.ingest import ingest

    raw = tmp_path / "raw"
    ids = [101, 102, 103]
    for object_id in ids:
        write_hsc(raw, object_id)
    (raw / "lenses.csv").write_text("objid,is_lens\n" + "".join(f"{i},{i % 2}\n" for i in ids))
    data = DataConfig(
        images=str(raw), catalog=str(raw / "lenses.csv"), profile="hsc", id_column="objid", label_column="is_lens"
    )
    preprocess = PreprocessConfig(out=str(tmp_path / "store.zarr"), bin=2, shard_size=2)
    summary = ingest(data, preprocess, progress=False)
    assert summary.n_written == 3 and not summary.rejects
    store = LensStore.open(preprocess.out)
    assert store.profile == PROFILES["hsc"] and store.sample_shape == (5, 32, 32)
    transform = store.meta["transform"]
    assert transform["native_pixel_scales"] == [0.168] * 5 and transform["reference_pixel_scale"] == 0.168
    assert "profile hsc" not in store.info() and "hsc: g 0.168" in store.info()
    scale = input_pixel_scale(transform)
    assert scale == pytest.approx(0.336)
    with pytest.raises(ConfigError, match=r'profile hsc has one \(0.168"/px\): use lastro/resnet/vit'):
        build_model(ModelConfig(name="twobranch"), 5, 32, scale)
    assert build_model(ModelConfig(name="lastro"), 5, 32, scale) is not None


def test_old_stores_and_transforms_mean_the_challenge() -> None:
    config = PreprocessConfig(crop=100, bin=2)
    challenge = describe(config, PROFILES["euclid_challenge"])
    assert challenge == describe(config) and "profile" not in challenge  # the record older runs compare to
    assert output_shape(PreprocessConfig(), PROFILES["lsst"]) == (100, 100)
    with pytest.raises(ValueError, match="larger than the 64-px i stamp"):
        output_shape(PreprocessConfig(crop=100), PROFILES["hsc"])
    # The challenge two-branch net keeps VIS alone in its first branch.
    net = build_model(ModelConfig(name="twobranch"), 4, 50, input_pixel_scale({"bin": 2}))
    assert net.fine_channels.tolist() == [0] and net.coarse_channels.tolist() == [1, 2, 3]


def test_a_run_scores_in_its_training_profile_and_refuses_another(tmp_path: Path) -> None:
    hsc = PROFILES["hsc"]
    config = PreprocessConfig(crop=32, bin=2)
    record = {"channels": 5, "size": 16, "bands": list(hsc.band_names), "store": "s", "transform": None}
    record["transform"] = describe(config, hsc, hsc.band_names)
    (tmp_path / "model_input.json").write_text(json.dumps(record))
    prepared, profile = checkpoint_input(str(tmp_path))
    assert profile == hsc and prepared.bands == hsc.band_names and prepared.preprocess.crop == 32
    with pytest.raises(ScoreError, match="trained on profile hsc .* not the requested profile euclid_challenge"):
        checkpoint_input(str(tmp_path), profile=PROFILES["euclid_challenge"])


def test_a_record_without_a_profile_means_the_challenge_layout_and_a_dump_round_trips() -> None:
    assert recorded_profile(None) == PROFILES["euclid_challenge"]
    dumped = json.loads(json.dumps(PROFILES["hsc"].model_dump(mode="json")))
    assert recorded_profile(dumped) == PROFILES["hsc"]
    with pytest.raises(ValueError):
        recorded_profile({"name": "broken", "bands": []})
