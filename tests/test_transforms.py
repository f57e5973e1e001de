"""transforms: each mode against a direct numpy/astropy computation, resampling against scipy, geometry,
batch == single bit for bit, degenerate inputs and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from astropy.visualization import LogStretch
from scipy import ndimage

from lensray.config import PreprocessConfig
from lensray.ingest.preprocess import (
    PreprocessError,
    describe,
    interpolation_matrix,
    normalise_band,
    output_shape,
    preprocess_batch,
    preprocess_cutout,
    resample_to_vis,
    robust_sigma,
)
from lensray.sky.bands import BAND_NAMES
from lensray.train.feed import Jitter, apply_jitter, photometric_jitter, random_shift

NOISE = 1e-12  # raw fluxes are ~1e-12..1e-10


def _blob(shape: tuple[int, int], pixel_scale: float, flux: float, width_arcsec: float = 0.4) -> np.ndarray:
    """A Gaussian source at the stamp centre."""
    y, x = ((np.arange(n) - (n - 1) / 2) * pixel_scale for n in shape)
    r2 = y[:, None] ** 2 + x[None, :] ** 2
    return flux * np.exp(-r2 / (2 * width_arcsec**2))


def make_cutout(rng: np.random.Generator, nir_shape: tuple[int, int] = (66, 66), sky: float = 0.0) -> dict:
    """A source plus Gaussian noise in every band, float32 like the FITS files (VIS big-endian, as astropy gives)."""
    cutout = {"VIS": (_blob((200, 200), 0.1, 50 * NOISE) + sky + rng.normal(0, NOISE, (200, 200))).astype(">f4")}
    for band in ("Y", "J", "H"):
        nir = _blob(nir_shape, 0.3, 80 * NOISE) + sky + rng.normal(0, 2 * NOISE, nir_shape)
        cutout[band] = nir.astype(np.float32)
    return cutout


def _border(image: np.ndarray, width: int) -> np.ndarray:
    mask = np.ones(image.shape, bool)
    mask[width:-width, width:-width] = False
    return image[mask]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


# -------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize("mode", ["asinh", "log", "clip"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_shape_dtype_finite_and_range(rng, mode, dtype):
    out = preprocess_cutout(make_cutout(rng), PreprocessConfig(mode=mode, dtype=dtype))
    assert out.shape == (4, 200, 200)
    assert out.dtype == np.dtype(dtype)
    assert np.isfinite(out).all()
    if mode in ("log", "clip"):
        assert out.min() >= 0.0 and out.max() <= 1.0
    else:
        # the source is ~50 sigma: arcsinh(50/3) ~ 3.5; the noise sits around 0
        assert 2.5 < out[0].max() < 5.0 and abs(float(np.median(out[0]))) < 0.1
    assert all(out[c].std() > 0 for c in range(4))  # no band silently zeroed


def test_robust_sigma_is_mad_of_the_border(rng):
    image = rng.normal(5.0, 2.0, (200, 200))
    image[8:-8, 8:-8] += 1000.0  # the interior must not count
    frame = _border(image, 8)
    expected = 1.4826 * np.median(np.abs(frame - np.median(frame)))
    assert robust_sigma(image, 8) == pytest.approx(expected, rel=1e-12)
    assert robust_sigma(image, 8) == pytest.approx(2.0, rel=0.05)
    stack = np.stack([image, 3 * image])
    np.testing.assert_allclose(robust_sigma(stack, 8), [expected, 3 * expected], rtol=1e-12)


def test_asinh_matches_direct_numpy(rng):
    vis = make_cutout(rng)["VIS"].astype(np.float64)
    frame = _border(vis, 8)
    sigma = 1.4826 * np.median(np.abs(frame - np.median(frame)))
    expected = np.arcsinh((vis - np.median(vis)) / sigma / 3.0)
    np.testing.assert_allclose(normalise_band(vis, "asinh"), expected, rtol=2e-5, atol=2e-6)
    channel = preprocess_cutout(make_cutout(rng), PreprocessConfig(dtype="float32"), ("VIS",))[0]
    assert channel.shape == (200, 200)


def test_asinh_on_pure_noise_is_arcsinh_of_unit_noise(rng):
    out = normalise_band(rng.normal(0.0, 7 * NOISE, (200, 200)), "asinh", softening=3.0)
    reference = np.arcsinh(np.random.default_rng(0).standard_normal(1_000_000) / 3.0)
    assert abs(out.mean()) < 0.01
    assert out.std() == pytest.approx(reference.std(), rel=0.05)
    back_in_sigma = 3.0 * np.sinh(out.astype(np.float64))
    assert back_in_sigma.std() == pytest.approx(1.0, rel=0.05)


def test_nir_sigma_is_measured_on_native_pixels(rng):
    cutout = make_cutout(rng)
    config = PreprocessConfig(dtype="float32")
    out = preprocess_cutout(cutout, config)
    native = cutout["H"].astype(np.float64)
    scaled = (native - np.median(native)) / robust_sigma(native, 8)
    expected = np.arcsinh(resample_to_vis(scaled, 0.3) / 3.0)
    np.testing.assert_allclose(out[3], expected, rtol=1e-4, atol=1e-5)
    # interpolation smooths the noise: measured after upsampling, sigma would come out too low
    assert robust_sigma(resample_to_vis(native, 0.3), 8) < 0.9 * robust_sigma(native, 8)


def test_log_matches_astropy_logstretch_plus_minmax(rng):
    vis = make_cutout(rng)["VIS"].astype(np.float64)
    first = (vis - vis.min()) / (vis.max() - vis.min())
    stretched = LogStretch(a=1000)(first)
    expected = (stretched - stretched.min()) / (stretched.max() - stretched.min())
    out = normalise_band(vis, "log")
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize("sky", [0.0, 20 * NOISE, -20 * NOISE])  # v_min < 0, v_min > 0, v_max < 0
def test_clip_matches_percentiles_plus_astropy_logstretch(rng, sky):
    vis = make_cutout(rng, sky=sky)["VIS"].astype(np.float64)
    v_min, v_max = np.percentile(vis, [0.25, 99.75])
    out = normalise_band(vis, "clip")
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    if v_max > 0:
        expected = LogStretch(a=1000)(np.clip(vis, min(-0.7 * v_min, v_max), v_max) / v_max)
        np.testing.assert_allclose(out, expected, atol=2e-6)
    else:  # no positive flux to stretch: documented as all zeros
        assert not out.any()
    if v_min < 0:  # the literal lower bound is positive: the background becomes a flat floor
        assert out.min() == pytest.approx(LogStretch(a=1000)(np.array([-0.7 * v_min / v_max]))[0], abs=1e-6)


@pytest.mark.parametrize("mode", ["asinh", "log", "clip"])
def test_constant_and_zero_images_stay_finite(mode):
    cutout = {"VIS": np.full((200, 200), 3e-12, np.float32)}
    cutout.update({band: np.zeros((66, 66), np.float32) for band in ("Y", "J", "H")})
    out = preprocess_cutout(cutout, PreprocessConfig(mode=mode, dtype="float32"))
    assert np.isfinite(out).all()


def test_constant_border_falls_back_to_whole_stamp_std(rng):
    image = np.zeros((66, 66))
    image[20:40, 20:40] = rng.normal(0, 1.0, (20, 20))
    assert robust_sigma(image, 8) == 0.0
    out = normalise_band(image, "asinh", softening=1.0)
    np.testing.assert_allclose(out, np.arcsinh(image / image.std()), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- resampling


def _vis_centres_in_stamp_pixels(n_src: int) -> np.ndarray:
    """Sky offset of each VIS pixel centre from the stamp centre, in the NIR stamp's pixel coordinates."""
    sky = (np.arange(200) + 0.5 - 100) * 0.1
    return (n_src - 1) / 2 + sky / 0.3


@pytest.mark.parametrize("shape", [(66, 66), (65, 65), (67, 67), (66, 65)])
def test_bilinear_matches_map_coordinates(rng, shape):
    stamp = rng.normal(0, 1, shape).astype(np.float32)
    rows = _vis_centres_in_stamp_pixels(shape[0])
    cols = _vis_centres_in_stamp_pixels(shape[1])
    grid = np.meshgrid(rows, cols, indexing="ij")
    expected = ndimage.map_coordinates(stamp.astype(np.float64), grid, order=1, mode="nearest")
    out = resample_to_vis(stamp, 0.3, method="bilinear")
    assert out.shape == (200, 200)
    np.testing.assert_allclose(out, expected, atol=2e-6)


@pytest.mark.parametrize("method,degree", [("bilinear", 1), ("bicubic", 2)])
@pytest.mark.parametrize("shape", [(66, 66), (67, 65)])
def test_resampling_reproduces_polynomials_on_the_sky(method, degree, shape):
    """Independent geometry check: a function of sky position sampled on the NIR grid comes back as the
    same function at the VIS pixel centres (inside the NIR footprint)."""

    def field(y, x):
        return 0.3 + 0.8 * x - 0.5 * y + (0.2 * x * y - 0.1 * y * y if degree == 2 else 0.0)

    nir_y = (np.arange(shape[0]) + 0.5 - shape[0] / 2) * 0.3
    nir_x = (np.arange(shape[1]) + 0.5 - shape[1] / 2) * 0.3
    vis = (np.arange(200) + 0.5 - 100) * 0.1
    stamp = field(nir_y[:, None], nir_x[None, :])
    out = resample_to_vis(stamp, 0.3, method=method)
    expected = field(vis[:, None], vis[None, :])
    inner = slice(8, -8)  # away from the edge replication (and bicubic's edge taps)
    np.testing.assert_allclose(out[inner, inner], expected[inner, inner], atol=2e-5)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_interpolation_rows_sum_to_one_and_batch_equals_single(rng, method):
    matrix = interpolation_matrix(65, 0.3, 200, 0.1, method)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    stack = rng.normal(0, 1, (5, 66, 65)).astype(np.float32)
    batch = resample_to_vis(stack, 0.3, method=method)
    for stamp, resampled in zip(stack, batch, strict=False):
        assert np.array_equal(resample_to_vis(stamp, 0.3, method=method), resampled)
    cropped = resample_to_vis(stack, 0.3, method=method, crop=100)
    np.testing.assert_allclose(cropped, batch[:, 50:150, 50:150], atol=1e-6)


def test_off_size_nir_stamps_preprocess_to_the_vis_grid(rng):
    for shape in [(65, 65), (67, 67), (66, 65)]:
        out = preprocess_cutout(make_cutout(rng, nir_shape=shape), PreprocessConfig(upsample="bicubic"))
        assert out.shape == (4, 200, 200) and np.isfinite(out).all()
        # the source sits at the centre in every band
        peak = np.unravel_index(np.argmax(out[1].astype(np.float32)), (200, 200))
        assert abs(peak[0] - 99.5) <= 3 and abs(peak[1] - 99.5) <= 3


# ------------------------------------------------------------------------------------------ geometry


def test_crop_and_bin_geometry_is_a_block_mean(rng):
    cutout = make_cutout(rng)
    config = PreprocessConfig(crop=100, bin=2, dtype="float32")
    assert output_shape(config) == (50, 50)
    binned = preprocess_cutout(cutout, config)
    assert binned.shape == (4, 50, 50)
    full = preprocess_cutout(cutout, PreprocessConfig(dtype="float32"))
    cropped = preprocess_cutout(cutout, PreprocessConfig(crop=100, dtype="float32"))
    np.testing.assert_allclose(cropped, full[:, 50:150, 50:150], atol=1e-5)
    block_mean = cropped.reshape(4, 50, 2, 50, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(binned, block_mean, rtol=1e-6, atol=1e-6)


def test_output_shape_and_describe():
    assert output_shape(PreprocessConfig()) == (200, 200)
    assert output_shape(PreprocessConfig(bin=4)) == (50, 50)
    with pytest.raises(ValueError, match="crop=300"):
        output_shape(PreprocessConfig(crop=300, bin=1))
    config = PreprocessConfig(mode="clip", upsample="bicubic", crop=100, bin=2, asinh_softening=2.0)
    meta = json.loads(json.dumps(describe(config)))
    assert meta["mode"] == "clip" and meta["interpolation"] == "bicubic"
    assert meta["crop"] == 100 and meta["bin"] == 2 and meta["dtype"] == "float16"
    assert meta["asinh_softening"] == 2.0 and meta["output_shape"] == [50, 50]


# ------------------------------------------------------------------------------ batch == single, bands


@pytest.mark.parametrize(
    "config",
    [
        PreprocessConfig(),
        PreprocessConfig(mode="log", upsample="bicubic", dtype="float32"),
        PreprocessConfig(mode="clip", crop=100, bin=2),
        PreprocessConfig(mode="asinh", upsample="bicubic", crop=120, bin=3, dtype="float32"),
    ],
    ids=["asinh", "log-bicubic", "clip-crop-bin", "asinh-bicubic-crop-bin"],
)
def test_batch_is_bit_identical_to_single(rng, config):
    cutouts = [make_cutout(rng) for _ in range(5)] + [make_cutout(rng, (65, 67))] + [make_cutout(rng)]
    cutouts[2] = {band: np.zeros_like(stamp) for band, stamp in cutouts[2].items()}  # hits the fallbacks
    batch = preprocess_batch(cutouts, config)
    assert batch.shape == (7, 4, *output_shape(config))
    singles = np.stack([preprocess_cutout(cutout, config) for cutout in cutouts])
    assert batch.dtype == singles.dtype == np.dtype(config.dtype)
    assert batch.tobytes() == singles.tobytes()
    # ... and independent of the rest of the batch
    assert preprocess_batch(cutouts[3:], config).tobytes() == batch[3:].tobytes()


def test_band_subsets_follow_band_order(rng):
    cutout = make_cutout(rng)
    config = PreprocessConfig(dtype="float32")
    full = preprocess_cutout(cutout, config)
    vis_only = preprocess_cutout({"VIS": cutout["VIS"]}, config, ("VIS",))
    assert vis_only.shape == (1, 200, 200)
    assert np.array_equal(vis_only[0], full[0])
    pair = preprocess_cutout(cutout, config, ("VIS", "H"))
    assert np.array_equal(pair, full[[0, 3]])
    assert np.array_equal(preprocess_batch([cutout], config, ("J",))[0, 0], full[BAND_NAMES.index("J")])


# ------------------------------------------------------------------------------------------- errors


def test_bad_input_raises_errors_naming_object_and_band(rng):
    config = PreprocessConfig()
    cutout = make_cutout(rng)
    with_nan = dict(cutout, J=cutout["J"].copy())
    with_nan["J"][3, 4] = np.nan
    with pytest.raises(PreprocessError, match=r"object 200007: band J has 1 non-finite"):
        preprocess_batch([cutout, with_nan], config, ids=[200006, 200007])
    with pytest.raises(PreprocessError, match=r"object 200001: band H is missing"):
        preprocess_cutout({k: v for k, v in cutout.items() if k != "H"}, config, object_id=200001)
    with pytest.raises(PreprocessError, match=r"cutout 0: band VIS is \(199, 200\)"):
        preprocess_cutout(dict(cutout, VIS=cutout["VIS"][1:]), config)
    with pytest.raises(PreprocessError, match=r"band Y is \(200, 200\)"):
        preprocess_cutout(dict(cutout, Y=np.zeros((200, 200), np.float32)), config)
    with pytest.raises(ValueError, match="unknown band"):
        preprocess_cutout(cutout, config, ("VIS", "K"))
    with pytest.raises(ValueError, match="unknown preprocess mode"):
        normalise_band(cutout["VIS"], "sqrt")


# ----------------------------------------------------------------------------- thread-count independence

THREAD_CONFIGS = [
    PreprocessConfig(dtype="float32"),
    PreprocessConfig(mode="log", upsample="bicubic", crop=100, bin=2, dtype="float32"),
    PreprocessConfig(mode="clip", upsample="bicubic", crop=150),
]


def _preprocessed_bytes(cutouts: list[dict]) -> bytes:
    return b"".join(preprocess_batch(cutouts, config).tobytes() for config in THREAD_CONFIGS)


def test_preprocessing_is_independent_of_the_thread_count(rng):
    """1, 2 and 4 threads (torch's and every BLAS/OpenMP pool numpy uses) give the same bytes: a store
    must not depend on the node or the Ray task's thread budget (a Ray task gets OMP_NUM_THREADS=1)."""
    import torch
    from threadpoolctl import threadpool_limits

    cutouts = [make_cutout(rng, shape) for shape in [(66, 66), (65, 67), (72, 60), (66, 66)]]
    saved = torch.get_num_threads()
    outputs = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            with threadpool_limits(threads):
                outputs[threads] = _preprocessed_bytes(cutouts)
    finally:
        torch.set_num_threads(saved)
    assert outputs[2] == outputs[1] and outputs[4] == outputs[1]


_THREADS_SCRIPT = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_limits
sys.path.insert(0, sys.argv[1])
from test_transforms import _preprocessed_bytes, make_cutout
rng = np.random.default_rng(7)
cutouts = [make_cutout(rng, shape) for shape in [(66, 66), (65, 67), (72, 60)]]
digests = {}
for threads in (1, 2, 4):
    with threadpool_limits(threads):
        digests[threads] = __import__("hashlib").sha256(_preprocessed_bytes(cutouts)).hexdigest()
print(json.dumps(digests))
"""


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and " avx2" in line and " fma" in line for line in info)
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx2(), reason="OpenBLAS's Haswell kernels need AVX2 and FMA")
def test_preprocessing_is_independent_of_the_blas_kernel_threading(tmp_path):
    """OpenBLAS's Haswell/Zen GEMM kernels (most x86 nodes) split work across threads so that results
    differ in the last bit; on this CPU's own kernel they may not. Force those kernels in a fresh
    process (OPENBLAS_CORETYPE is read when numpy loads) and check 1, 2 and 4 threads agree."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell"}
    done = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    digests = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(set(digests.values())) == 1, digests


# --- train-time jitter beyond D4 (lensray.train.feed): shifts, flux scaling, noise ----------------


def _jitter_batch() -> torch.Tensor:
    grid = torch.arange(20.0) - 9.5
    blob = torch.exp(-(grid[:, None] ** 2 + (grid[None, :] - 2) ** 2) / 8)  # off-centre along x
    return torch.asinh(torch.stack([blob * 40, blob * 10]))[None].repeat(6, 1, 1, 1)  # (6, 2, 20, 20)


@pytest.mark.parametrize("softening", [None, 3.0])
def test_jitter_keeps_shape_dtype_and_is_deterministic_from_the_seed(softening):
    jitter = Jitter(shift_px=1.5, flux_jitter=0.2, noise_jitter=0.5, softening=softening)
    x = _jitter_batch()
    first = apply_jitter(x, jitter, torch.Generator().manual_seed(5))
    again = apply_jitter(x, jitter, torch.Generator().manual_seed(5))
    other = apply_jitter(x, jitter, torch.Generator().manual_seed(6))
    assert first.shape == x.shape and first.dtype == x.dtype and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # each sample its own draw
    assert apply_jitter(x, Jitter(), torch.Generator()) is x  # off: untouched


def test_shift_moves_the_light_by_at_most_shift_px():
    x = _jitter_batch()
    shifted = random_shift(x, 1.5, torch.Generator().manual_seed(0))
    grid = torch.arange(20.0) - 9.5

    def centroid(img):
        weights = torch.sinh(img[:, 0])
        return (
            torch.stack([(weights * grid[None, None, :]).sum((1, 2)), (weights * grid[None, :, None]).sum((1, 2))], 1)
            / weights.sum((1, 2))[:, None]
        )

    moved = centroid(shifted) - centroid(x)
    assert (moved.abs() <= 1.5 + 0.05).all() and (moved.abs() > 0.01).any()
    assert torch.allclose(random_shift(x, 1e-9, torch.Generator()), x, atol=1e-5)  # a zero shift is the identity


def test_flux_scaling_stays_within_bounds_and_is_exact_for_asinh_inputs():
    x = _jitter_batch()
    for softening in (None, 3.0):
        out = photometric_jitter(x, Jitter(flux_jitter=0.25, softening=softening), torch.Generator().manual_seed(1))
        # min-max scaled inputs: the values themselves are scaled; asinh: the linear flux, then the stretch redone
        ratio = out / x if softening is None else torch.sinh(out) / torch.sinh(x)
        mask = x.abs() > 1e-3
        per_band = ratio[mask].reshape(-1)
        assert (per_band >= 0.75 - 1e-4).all() and (per_band <= 1.25 + 1e-4).all()
        # One factor per sample and band: the morphology (what tells a lens) is untouched.
        band_ratio = ratio[0, 0][mask[0, 0]]
        assert torch.allclose(band_ratio, band_ratio[0].expand_as(band_ratio), rtol=1e-3)


def test_noise_jitter_adds_noise_of_at_most_the_given_std():
    x = torch.zeros(64, 1, 30, 30)
    out = photometric_jitter(x, Jitter(noise_jitter=0.5), torch.Generator().manual_seed(2))
    stds = out.std(dim=(1, 2, 3))
    assert stds.max() < 0.5 * 1.1 and stds.min() < 0.2 and stds.mean() == pytest.approx(0.25, abs=0.06)
