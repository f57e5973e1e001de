"""fits_io against real FITS files (astropy) on local disk and on moto's S3 server."""

from __future__ import annotations

import io
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from lensray import storage
from lensray.sky.bands import BAND_NAMES, band_relpath
from lensray.sky.fits import CutoutError, decode_band, read_cutout, read_cutouts

SHAPES = {"VIS": (200, 200), "Y": (66, 66), "J": (66, 66), "H": (65, 67)}  # H off-size, as in the real data


def fits_bytes(data: np.ndarray | None) -> bytes:
    buffer = io.BytesIO()
    fits.PrimaryHDU(data).writeto(buffer)
    return buffer.getvalue()


def stamp(object_id: int, band: str) -> np.ndarray:
    """Raw-flux-like float32 image, different for every (ID, band)."""
    rng = np.random.default_rng([object_id, BAND_NAMES.index(band)])
    return (rng.normal(1e-11, 3e-12, SHAPES[band])).astype(np.float32)


def write_object(root: str, object_id: int, bands: tuple[str, ...] = BAND_NAMES) -> dict[str, np.ndarray]:
    images = {band: stamp(object_id, band) for band in bands}
    for band, image in images.items():
        storage.write_bytes(storage.join(root, band_relpath(band, object_id)), fits_bytes(image))
    return images


def put(root: str, object_id: int, band: str, data: bytes) -> str:
    url = storage.join(root, band_relpath(band, object_id))
    storage.write_bytes(url, data)
    return url


def assert_same(cutout_bands: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(cutout_bands) == list(expected)
    for band, image in expected.items():
        got = cutout_bands[band]
        assert got.dtype == np.float32 and got.dtype.isnative
        assert got.shape == image.shape  # native shape kept, no resampling
        np.testing.assert_array_equal(got, image)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_reads_back_every_band(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    root = (
        str(tmp_path / "Public") if where == "local" else storage.join(request.getfixturevalue("s3_bucket"), "Public")
    )
    expected = write_object(root, 200001)
    cutout = read_cutout(root, 200001, BAND_NAMES, "reject")
    assert cutout.object_id == 200001
    assert_same(cutout.bands, expected)
    assert cutout.nan_pixels == {band: 0 for band in BAND_NAMES}

    vis_only = read_cutout(root, 200001, ("VIS",))
    assert list(vis_only.bands) == ["VIS"]


def _nan_stamp() -> np.ndarray:
    image = stamp(7, "Y")
    image[3, 4] = np.nan
    image[10, :5] = np.nan
    image[0, 0] = np.inf
    return image


def _all_nan() -> np.ndarray:
    return np.full((66, 66), np.nan, dtype=np.float32)


# (name, FITS bytes for band Y, nan policy, expected reason, words the message must hold)
BAD_INPUTS = [
    ("truncated", fits_bytes(stamp(7, "Y"))[:-3000], "zero", "corrupt", "truncated: 20040 bytes"),
    ("header_only", fits_bytes(stamp(7, "Y"))[:2880], "zero", "corrupt", "truncated: 2880 bytes"),
    ("non_fits", b"SIMPLE? no: this is a text file, not FITS\n" * 80, "zero", "corrupt", "not a readable FITS"),
    ("zero_bytes", b"", "zero", "corrupt", "0 bytes"),
    ("empty_hdu", fits_bytes(None), "zero", "empty", "no image data"),
    ("three_d", fits_bytes(np.ones((2, 66, 66), dtype=np.float32)), "zero", "shape", "3-D"),
    ("all_nan", fits_bytes(_all_nan()), "zero", "all_nan", "all 4356 pixels"),
    ("all_zero", fits_bytes(np.zeros((66, 66), dtype=np.float32)), "zero", "empty", "every finite pixel is 0"),
    ("nan_reject", fits_bytes(_nan_stamp()), "reject", "nan", "7 of 4356 pixels"),
    ("constant", fits_bytes(np.full((66, 66), 5.0, dtype=np.float32)), "zero", "constant", "every finite pixel is 5"),
    (
        "constant_with_nan",
        fits_bytes(np.where(np.isfinite(_nan_stamp()), 2.5, np.nan)),
        "zero",
        "constant",
        "7 NaN/inf",
    ),
    ("off_size", fits_bytes(stamp(7, "Y")[:50, :50]), "zero", "shape", "(50, 50), expected about 66x66"),
]


@pytest.mark.filterwarnings("ignore:File may have been truncated")  # astropy's own notice, before our error
@pytest.mark.parametrize(("name", "data", "policy", "reason", "words"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_band_is_a_clear_error(
    name: str, data: bytes, policy: str, reason: str, words: str, tmp_path: Path
) -> None:
    root = str(tmp_path)
    write_object(root, 7, ("VIS",))
    url = put(root, 7, "Y", data)
    with pytest.raises(CutoutError) as info:
        read_cutout(root, 7, ("VIS", "Y"), policy)
    err = info.value
    assert (err.object_id, err.band, err.url, err.reason) == (7, "Y", url, reason)
    assert "ID 7" in str(err) and "band Y" in str(err) and url in str(err) and words in str(err)


def test_missing_band_file(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_object(root, 9, ("VIS", "Y", "J"))
    with pytest.raises(CutoutError, match=r"ID 9 band H .*imageEUC_H-9\.fits.*missing") as info:
        read_cutout(root, 9, BAND_NAMES)
    assert info.value.reason == "missing"


def test_all_nan_rejected_under_either_policy(tmp_path: Path) -> None:
    put(str(tmp_path), 3, "VIS", fits_bytes(np.full((200, 200), np.nan, dtype=np.float32)))
    for policy in ("zero", "reject"):
        with pytest.raises(CutoutError) as info:
            read_cutout(str(tmp_path), 3, ("VIS",), policy)
        assert info.value.reason == "all_nan"


def test_nan_zero_policy_counts_and_zeroes(tmp_path: Path) -> None:
    image = _nan_stamp()
    bad = ~np.isfinite(image)
    put(str(tmp_path), 7, "Y", fits_bytes(image))
    cutout = read_cutout(str(tmp_path), 7, ("Y",), "zero")
    assert cutout.nan_pixels == {"Y": int(bad.sum())} and cutout.total_nan_pixels == 7
    got = cutout.bands["Y"]
    assert np.all(got[bad] == 0.0)
    np.testing.assert_array_equal(got[~bad], image[~bad])  # nothing else touched


def test_integer_image_with_bscale_comes_out_scaled_float32() -> None:
    hdu = fits.PrimaryHDU(np.arange(1, 13, dtype=np.int16).reshape(3, 4))
    hdu.scale("int16", bscale=0.5, bzero=10.0)
    buffer = io.BytesIO()
    hdu.writeto(buffer)
    image, n_nan = decode_band(buffer.getvalue(), 1, "VIS", "mem://x", "reject")
    assert image.dtype == np.float32 and n_nan == 0
    np.testing.assert_allclose(image, np.arange(1, 13).reshape(3, 4))


def test_read_cutouts_rejects_bad_objects_and_keeps_the_rest(tmp_path: Path) -> None:
    root = str(tmp_path)
    good_ids = [101, 103, 105]
    expected = {i: write_object(root, i) for i in good_ids}
    write_object(root, 102, ("VIS", "Y", "J"))  # H missing
    write_object(root, 104)
    put(root, 104, "J", fits_bytes(_all_nan()))
    write_object(root, 106)
    put(root, 106, "VIS", b"garbage")
    ids = [101, 102, 103, 104, 105, 106, 107]  # 107: no files at all
    for threads in (1, 4):
        cutouts, rejects = read_cutouts(root, ids, BAND_NAMES, "zero", threads=threads)
        assert [c.object_id for c in cutouts] == good_ids
        for cutout in cutouts:
            assert_same(cutout.bands, expected[cutout.object_id])
        assert [(r.object_id, r.reason) for r in rejects] == [
            (102, "missing"),
            (104, "all_nan"),
            (106, "corrupt"),
            (107, "missing"),
        ]
        _object_id, _reason, message = rejects[0]
        assert "ID 102 band H" in message and str(rejects[0]) == message


def test_s3_missing_object_is_a_reject_missing_bucket_is_a_storage_error(s3_bucket: str) -> None:
    root = storage.join(s3_bucket, "Public")
    write_object(root, 1)
    cutouts, rejects = read_cutouts(root, [1, 2], BAND_NAMES)
    assert [c.object_id for c in cutouts] == [1]
    assert [(r.object_id, r.reason) for r in rejects] == [(2, "missing")]

    wrong_root = "s3://no-such-bucket-lensray/Public"
    with pytest.raises(storage.StorageError, match="no-such-bucket-lensray"):
        read_cutout(wrong_root, 1, BAND_NAMES)  # not a per-object "missing"
    with pytest.raises(storage.StorageError, match="no-such-bucket-lensray"):
        read_cutouts(wrong_root, [1, 2], BAND_NAMES)


@pytest.fixture()
def moto_auth(s3_server: str) -> Iterator[None]:
    """Switch on moto's IAM authentication: the suite's credentials then belong to no IAM user (403)."""

    def set_count(value: str) -> None:
        request = urllib.request.Request(
            f"{s3_server}/moto-api/reset-auth",
            data=value.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).read()

    set_count("0")
    try:
        yield
    finally:
        set_count("inf")


def test_refused_credentials_fail_the_run_not_the_object(s3_bucket: str, moto_auth: None) -> None:
    root = storage.join(s3_bucket, "Public")
    with pytest.raises(storage.StorageError, match=r"imageEUC_VIS-1\.fits.*ACCESS_DENIED"):
        read_cutout(root, 1, BAND_NAMES)
    with pytest.raises(storage.StorageError, match=s3_bucket.removeprefix("s3://")):
        read_cutouts(root, [1, 2, 3], BAND_NAMES)


def test_unreachable_endpoint_fails_the_run(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(storage.StorageError, match=r"imageEUC_VIS-1\.fits"):
        read_cutout(storage.join(s3_bucket, "Public"), 1, ("VIS",))


def test_missing_local_root_fails_the_run(tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match="does not exist"):
        read_cutouts(str(tmp_path / "no-such-root"), [1, 2], ("VIS",))


def test_bad_nan_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nan_policy"):
        read_cutouts(str(tmp_path), [1], ("VIS",), "ignore")  # type: ignore[arg-type]
