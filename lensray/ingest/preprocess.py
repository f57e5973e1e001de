"""Raw cutout -> network input: per-band normalisation, resampling onto the reference band's grid,
stacking, central crop and integer binning. Pure numpy (+ astropy's stretches and ``reproject``); no I/O,
no Ray, no torch.

The grid is the survey profile's (``lensray.profiles``; default ``euclid_challenge``): its *reference*
band (VIS for Euclid, i for HSC and LSST) is the network's grid, and every function here takes the
profile (``profile=``, None: the challenge's).

Order of operations, per band, and why
--------------------------------------
1. **Statistics on the native pixels** of the band's own stamp (median, border noise sigma, min/max or
   percentiles). Resampling correlates neighbouring pixels and lowers the measured noise by a
   position-dependent factor, so sigma measured after upsampling would be biased low.
2. **The affine part** of the mode (subtract, divide) on the native pixels.
3. **Resampling** onto the reference grid (bands not already on it). Interpolation is linear with
   weights summing to one, so it commutes with step 2, and it acts on (scaled) flux, where
   interpolation is meaningful.
4. **The pointwise non-linear part** (arcsinh, clip, LogStretch) on the reference grid. Stretching after
   interpolation keeps bicubic overshoot inside the documented range (clips happen last).
For the reference band (no resampling) this is exactly "normalise the stamp", i.e. ``normalise_band``.
Because every statistic comes from the native stamp and steps 3-4 are per pixel, the central crop can be
taken before step 3 (only the cropped block is resampled and stretched) with the same result as cropping
afterwards. Then the bands are stacked in the requested order, binned (block mean) and cast to
``config.dtype``.

Modes (per band; ``x`` = native pixels)
---------------------------------------
* ``asinh`` (default): ``arcsinh((x - median(x)) / (sigma * softening))``, sigma = 1.4826 x MAD of
  the stamp's outer ``border``-pixel frame (in the stamp's own pixels). If that sigma is 0 (e.g. a
  constant border), the standard deviation of the whole stamp is used, and if that is 0 too (a constant
  stamp), 1: the output is then 0 everywhere. Unbounded but finite, roughly N(0, 1)/softening in the
  noise and ~log(flux) on sources.
* ``log`` (the study's): ``y = (x - min) / (max - min)``, then astropy ``LogStretch(a=1000)`` (which
  expects and clips to [0, 1]), then min-max again. Since the stretch is monotone, the second min-max
  is taken between the stretch of 0 and of 1, the exact min and max of the stretched native stamp (it
  differs from the identity only by float rounding). Range [0, 1]. Constant stamp -> 0 everywhere.
  (Applied literally to raw fluxes of ~1e-11, LogStretch would be linear and clip all negatives to 0;
  the first min-max is what makes it a log stretch.)
* ``clip`` (the study's): ``v_min, v_max`` = the 0.25 % and 99.75 % percentiles; clip below at
  ``-0.7 * v_min`` and above at ``v_max``; divide by ``v_max``; ``LogStretch(a=1000)``. Range [0, 1].
  See ``_clip_scaling`` for what the literal lower bound does when ``v_min`` is negative or positive.

Geometry
--------
The reference stamp must be exactly its band's ``size`` (challenge: VIS 200x200 at 0.1"/px); other
bands their ``size`` give or take their ``size_tolerance`` (challenge NIR: 66 +- 6 px at 0.3"/px). A
band reaches the reference grid one of three ways, per stamp:

* **cropped**, like the reference itself, when it has the reference's pixel scale and stamp size and no
  WCS says otherwise (Euclid MER, HSC and LSST cutouts: every band on one grid);
* **by pixel-scale ratio** (separable bilinear/bicubic, ``resample_to_vis``): the reference pixel
  centres are mapped into the band's own pixel coordinates assuming both stamps are centred on the same
  sky position; outside the band's footprint (challenge: 66 x 0.3" = 19.8" < 20") the edge value is
  repeated, like ``scipy.ndimage.map_coordinates(mode="nearest")``;
* **by WCS** (``reproject.reproject_interp``, order ``bilinear``) when both the band's and the reference's
  headers carry a celestial WCS *and* that WCS disagrees with the centred pixel-scale mapping by more
  than ``WCS_TOLERANCE_PX`` band pixels anywhere on the reference stamp (an offset, a rotation, another
  scale). A WCS that agrees with it (e.g. the simulator's, centred on the object) takes the cheaper
  path above, so the challenge layout keeps exactly today's bits and speed with or without WCS headers.
  The band is edge-padded by ``WCS_EDGE_PAD`` pixels first (the same edge repetition); reference pixels
  still outside it are 0 after the affine step (the background level for ``asinh``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from astropy.visualization import LogStretch

from lensray.config import PreprocessConfig
from lensray.errors import PreprocessError
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile, recorded_profile
from lensray.sky.bands import VIS_PIXEL_SCALE, VIS_SIZE, stamp_problem
from lensray.sky.fits import Cutout, Reject

if TYPE_CHECKING:
    from astropy.wcs import WCS

MAD_TO_SIGMA = 1.4826  # MAD -> sigma for Gaussian noise
LOG_STRETCH_A = 1000.0  # astropy's default, used by the study
CLIP_PERCENTILES = (0.25, 99.75)
# Lower clip bound = CLIP_LOWER_FACTOR * v_min: the study's rule, literally (README "Data contracts").
CLIP_LOWER_FACTOR = -0.7
KEYS_A = -0.5  # Keys (1981) cubic convolution: reproduces quadratics exactly
MODES = ("asinh", "log", "clip")
METHODS = ("bilinear", "bicubic")
# A band's WCS that maps the reference stamp within this many band pixels of the centred pixel-scale
# mapping is resampled by that (exact, cached, fast) mapping rather than by reproject.
WCS_TOLERANCE_PX = 0.01
WCS_EDGE_PAD = 2  # band pixels of edge repetition around a stamp resampled by WCS


class BandScaling(NamedTuple):
    """Per-stamp parameters of a band's normalisation, each of shape (k,) for k stamps.

    ``y = (x - offset) / scale`` on native pixels (for asinh, scale = sigma x softening); then, if ``lower``/``upper`` are given, ``y`` is
    clipped to them (in units of ``y``) before the mode's stretch.
    """

    offset: np.ndarray
    scale: np.ndarray
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------
# Normalisation


def _border_mask(shape: tuple[int, int], border: int) -> np.ndarray:
    height, width = shape
    mask = np.ones(shape, dtype=bool)
    mask[border : height - border, border : width - border] = False
    return mask


def robust_sigma(image: np.ndarray, border: int) -> np.ndarray | float:
    """1.4826 x MAD of the outer ``border``-pixel frame of ``image`` (h, w) or of each stamp of (..., h, w).

    No fallback here: a constant border gives 0 (``normalise_band`` handles that case).
    """
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"robust_sigma needs an image (..., h, w), got shape {image.shape}")
    if border < 1:
        raise ValueError(f"border must be >= 1 pixel, got {border}")
    frame = image[..., _border_mask(image.shape[-2:], border)]  # (..., n_border)
    centre = np.median(frame, axis=-1, keepdims=True)
    sigma = MAD_TO_SIGMA * np.median(np.abs(frame - centre), axis=-1)
    return float(sigma) if image.ndim == 2 else sigma


def _noise_scale(stack: np.ndarray, border: int) -> np.ndarray:
    """Border sigma per stamp of (k, h, w), with the documented fallbacks (whole-stamp std, then 1)."""
    sigma = np.asarray(robust_sigma(stack, border), dtype=np.float64)
    for i in np.flatnonzero(~(sigma > 0)):
        # One stamp at a time, so a batch computes exactly what a single call computes.
        whole_std = float(np.std(stack[i], dtype=np.float64))
        sigma[i] = whole_std if whole_std > 0 else 1.0
    return sigma


def _clip_scaling(stack: np.ndarray) -> BandScaling:
    v_min, v_max = (np.asarray(p, dtype=np.float64) for p in np.percentile(stack, CLIP_PERCENTILES, axis=(-2, -1)))
    # The literal lower bound -0.7 * v_min: for sky-subtracted data v_min < 0 (the noise's low tail,
    # ~-2.8 sigma), so the bound is *positive* (~+2 sigma): the background is raised to a flat floor.
    # If v_min > 0 (sky not subtracted) the bound is negative, below every pixel: no clipping from below.
    # A bound above v_max (pathological) is capped at v_max: the band becomes constant, not inverted.
    lower = np.minimum(CLIP_LOWER_FACTOR * v_min, v_max)
    positive = v_max > 0
    scale = np.where(positive, v_max, 1.0)
    # v_max <= 0: no positive flux in 99.75 % of the stamp, nothing to stretch: clip everything to 0.
    return BandScaling(
        offset=np.zeros_like(v_max),
        scale=scale,
        lower=np.where(positive, lower / scale, 0.0),
        upper=np.where(positive, 1.0, 0.0),
    )


def band_scaling(stack: np.ndarray, mode: str, border: int = 8, softening: float = 3.0) -> BandScaling:
    """Per-stamp normalisation parameters measured on native pixels of ``stack`` (k, h, w)."""
    if mode == "asinh":
        return BandScaling(np.median(stack, axis=(-2, -1)).astype(np.float64), _noise_scale(stack, border) * softening)
    if mode == "log":
        low = stack.min(axis=(-2, -1)).astype(np.float64)
        span = stack.max(axis=(-2, -1)).astype(np.float64) - low
        return BandScaling(low, np.where(span > 0, span, 1.0))  # constant stamp -> y = 0
    if mode == "clip":
        return _clip_scaling(stack)
    raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {MODES}")


def _per_stamp(values: np.ndarray) -> np.ndarray:
    """(k,) float64 parameters -> float32 (k, 1, 1), to broadcast against a (k, h, w) stack."""
    return values.astype(np.float32).reshape(-1, 1, 1)


def _apply_affine(stack: np.ndarray, scaling: BandScaling) -> np.ndarray:
    return (stack - _per_stamp(scaling.offset)) / _per_stamp(scaling.scale)


@lru_cache(maxsize=4)
def _log_stretch(a: float) -> tuple[LogStretch, np.float32, np.float32]:
    stretch = LogStretch(a)
    low, high = stretch(np.array([0.0, 1.0], dtype=np.float32), clip=True)
    return stretch, low, high


def _stretch(scaled: np.ndarray, scaling: BandScaling, mode: str) -> np.ndarray:
    """The pointwise, non-linear part of ``mode`` on affinely scaled values (any grid)."""
    if mode == "asinh":
        return np.arcsinh(scaled)
    stretch, low, high = _log_stretch(LOG_STRETCH_A)
    if mode == "clip":
        # Per-stamp bounds broadcast against (k, h, w).
        scaled = np.clip(scaled, _per_stamp(scaling.lower), _per_stamp(scaling.upper))
    stretched = stretch(scaled, clip=True)  # astropy's stretches take [0, 1]; clip=True enforces it
    if mode == "log":
        # Second min-max: low/high are the stretch of the first min-max's 0 and 1 (see module doc).
        stretched = (stretched - low) / (high - low)
    return stretched.astype(np.float32, copy=False)


def normalise_band(image: np.ndarray, mode: str = "asinh", *, softening: float = 3.0, border: int = 8) -> np.ndarray:
    """Normalise one band's stamp (h, w), or each stamp of (k, h, w), on its native grid -> float32.

    See the module docstring for the definition and output range of each mode.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"normalise_band needs (h, w) or (k, h, w), got shape {image.shape}")
    stack = image if image.ndim == 3 else image[None]
    scaling = band_scaling(stack, mode, border, softening)
    normalised = _stretch(_apply_affine(stack, scaling), scaling, mode)
    return normalised if image.ndim == 3 else normalised[0]


# --------------------------------------------------------------------------------------------------
# Resampling


def _keys_kernel(distance: np.ndarray) -> np.ndarray:
    s = np.abs(distance)
    near = ((KEYS_A + 2) * s - (KEYS_A + 3)) * s * s + 1
    far = ((KEYS_A * s - 5 * KEYS_A) * s + 8 * KEYS_A) * s - 4 * KEYS_A
    return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


@lru_cache(maxsize=64)
def interpolation_matrix(n_src: int, src_scale: float, n_dst: int, dst_scale: float, method: str) -> np.ndarray:
    """(n_dst, n_src) float32 weights sampling a centred ``n_src``-pixel axis at ``n_dst`` centred pixels.

    Destination pixel j sits at source pixel coordinate ``(n_src-1)/2 + (j - (n_dst-1)/2) * dst/src``
    (pixel centres at integers). Coordinates beyond the outer pixel centres take the edge value; bicubic
    taps beyond the edge reuse the edge pixel. Rows sum to 1. Cached, read-only.
    """
    if method not in METHODS:
        raise ValueError(f"unknown upsampling method {method!r}; expected one of {METHODS}")
    if n_src < 2:
        raise ValueError(f"cannot interpolate an axis of {n_src} pixel(s)")
    coords = (n_src - 1) / 2 + (np.arange(n_dst) - (n_dst - 1) / 2) * (dst_scale / src_scale)
    coords = np.clip(coords, 0.0, n_src - 1)
    rows = np.arange(n_dst)
    weights = np.zeros((n_dst, n_src), dtype=np.float64)
    if method == "bilinear":
        left = np.minimum(np.floor(coords).astype(int), n_src - 2)
        frac = coords - left
        np.add.at(weights, (rows, left), 1.0 - frac)
        np.add.at(weights, (rows, left + 1), frac)
    else:
        base = np.floor(coords).astype(int)
        frac = coords - base
        for tap in (-1, 0, 1, 2):
            np.add.at(weights, (rows, np.clip(base + tap, 0, n_src - 1)), _keys_kernel(frac - tap))
    matrix = weights.astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def _crop_start(side: int, crop: int | None) -> int:
    if crop is None:
        return 0
    if not 0 < crop <= side:
        raise ValueError(f"crop {crop} does not fit a {side}-px image")
    return (side - crop) // 2


class _Taps(NamedTuple):
    """An interpolation matrix's non-zero weights: destination pixel j = sum over t of
    ``weight[t, j] * source[index[t, j]]`` (rows with fewer taps are padded with weight 0)."""

    index: np.ndarray  # (taps, n_dst) source pixel indices
    weight: np.ndarray  # (taps, n_dst) float32


def _taps(matrix: np.ndarray) -> _Taps:
    nonzero = matrix != 0
    n_taps = max(1, int(nonzero.sum(axis=1).max()))
    index = np.zeros((n_taps, matrix.shape[0]), dtype=np.intp)
    weight = np.zeros((n_taps, matrix.shape[0]), dtype=np.float32)
    for row in range(matrix.shape[0]):
        columns = np.flatnonzero(nonzero[row])
        index[: len(columns), row] = columns
        weight[: len(columns), row] = matrix[row, columns]
    for array in (index, weight):
        array.setflags(write=False)
    return _Taps(index, weight)


@lru_cache(maxsize=64)
def _resampling_taps(
    src_shape: tuple[int, int],
    src_scale: float,
    dst_shape: tuple[int, int],
    dst_scale: float,
    method: str,
    crop: int | None,
) -> tuple[_Taps, _Taps]:
    """The taps along y and along x, restricted to the central crop of the destination."""
    (h_src, w_src), (h_dst, w_dst) = src_shape, dst_shape
    wy = interpolation_matrix(h_src, src_scale, h_dst, dst_scale, method)
    wx = interpolation_matrix(w_src, src_scale, w_dst, dst_scale, method)
    if crop is not None:
        y0, x0 = _crop_start(h_dst, crop), _crop_start(w_dst, crop)
        wy, wx = wy[y0 : y0 + crop], wx[x0 : x0 + crop]
    return _taps(wy), _taps(wx)


def _apply_taps(stack: np.ndarray, taps: _Taps, axis: int) -> np.ndarray:
    """Interpolate ``stack`` along ``axis`` (-2 or -1) as a fixed-order sum of the taps, elementwise.

    Not a matrix product: BLAS splits a GEMM between threads in ways that change the last bit of
    its sums with the thread count (OpenBLAS's Haswell/Zen kernels do), and a store must not depend
    on the node or the task's thread budget. Each output pixel adds its taps in the same order,
    whatever the threads, the batch or the machine.
    """
    shape = (-1, 1) if axis == -2 else (1, -1)
    total = np.take(stack, taps.index[0], axis=axis) * taps.weight[0].reshape(shape)
    for index, weight in zip(taps.index[1:], taps.weight[1:], strict=True):
        total += np.take(stack, index, axis=axis) * weight.reshape(shape)
    return total


def resample_to_vis(
    image: np.ndarray,
    src_pixel_scale: float,
    dst_shape: tuple[int, int] = (VIS_SIZE, VIS_SIZE),
    dst_pixel_scale: float = VIS_PIXEL_SCALE,
    method: str = "bilinear",
    crop: int | None = None,
) -> np.ndarray:
    """Resample a stamp (h, w), or a stack (k, h, w) of same-shape stamps, onto the VIS grid -> float32.

    Both grids are centred on the same sky position; any stamp size works (off-size NIR stamps are
    sampled in their own pixel coordinates). Separable: ``Wy @ image @ Wx.T`` (y first) with cached
    weights, exact for bilinear and for Keys bicubic, computed as fixed-order sums of each row's
    non-zero weights (2 or 4 taps) so that the result does not depend on the thread count.
    ``crop`` samples only the central crop x crop block of the destination (the same values as
    resampling and then cropping).
    """
    stack = np.asarray(image, dtype=np.float32)
    if stack.ndim not in (2, 3):
        raise ValueError(f"resample_to_vis needs (h, w) or (k, h, w), got shape {stack.shape}")
    taps_y, taps_x = _resampling_taps(
        tuple(stack.shape[-2:]), float(src_pixel_scale), tuple(dst_shape), float(dst_pixel_scale), method, crop
    )
    # Elementwise per pixel, so a stamp's result does not depend on the batch around it either.
    return _apply_taps(_apply_taps(stack, taps_y, axis=-2), taps_x, axis=-1)


# --------------------------------------------------------------------------------------------------
# Cutouts


def _survey(profile: SurveyProfile | None) -> SurveyProfile:
    return PROFILES[DEFAULT_PROFILE] if profile is None else profile


def output_shape(config: PreprocessConfig, profile: SurveyProfile | None = None) -> tuple[int, int]:
    """(S, S): the side after the optional central crop (default: the reference stamp) and the binning."""
    reference = _survey(profile).reference_band
    side = config.crop if config.crop is not None else reference.size
    if side > reference.size:
        raise ValueError(f"preprocess.crop={side} is larger than the {reference.size}-px {reference.name} stamp")
    if side % config.bin:
        raise ValueError(f"preprocess.bin={config.bin} does not divide the {side}-px side")
    return side // config.bin, side // config.bin


def describe(
    config: PreprocessConfig, profile: SurveyProfile | None = None, bands: Sequence[str] | None = None
) -> dict[str, Any]:
    """The transform as recorded in the store's metadata (JSON-serialisable).

    For the default ``euclid_challenge`` profile it is exactly what it always was (so older stores and
    runs compare equal); any other profile adds the profile itself (``profile``), the reference grid's
    pixel scale and each channel's native pixel scale (``native_pixel_scales``, in ``bands`` order:
    what the two-branch network splits its channels by).
    """
    survey = _survey(profile)
    record = {
        "mode": config.mode,
        "interpolation": config.upsample,
        "asinh_softening": config.asinh_softening,
        "border": config.border,
        "crop": config.crop,
        "bin": config.bin,
        "dtype": config.dtype,
        "output_shape": list(output_shape(config, survey)),
        "log_stretch_a": LOG_STRETCH_A,
        "clip_percentiles": list(CLIP_PERCENTILES),
        "clip_lower_factor": CLIP_LOWER_FACTOR,
        "bicubic": f"Keys a={KEYS_A}",
        "order": "stats on native pixels -> affine -> resample NIR to VIS grid -> crop -> stretch -> stack -> bin",
    }
    if survey == PROFILES[DEFAULT_PROFILE]:
        return record
    channels = _check_band_order(survey.band_names if bands is None else bands, survey)
    record["order"] = (
        "stats on native pixels -> affine -> resample to the reference grid (WCS or pixel-scale ratio) -> crop "
        "-> stretch -> stack -> bin"
    )
    record["reference_pixel_scale"] = survey.reference_band.pixel_scale
    record["native_pixel_scales"] = [survey.band(band).pixel_scale for band in channels]
    record["profile"] = survey.model_dump(mode="json")
    return record


def profile_of(transform: Mapping[str, Any] | None) -> SurveyProfile:
    """The survey profile a recorded transform was made for (a record without one: ``euclid_challenge``)."""
    return recorded_profile((transform or {}).get("profile"))


def _check_band_order(band_order: Sequence[str], profile: SurveyProfile | None = None) -> tuple[str, ...]:
    survey = _survey(profile)
    bands = tuple(band_order)
    if not bands:
        raise ValueError("band_order is empty: at least one band is required")
    unknown = [b for b in bands if b not in survey.band_names]
    if unknown:
        raise ValueError(f"unknown band(s) {unknown}; expected a subset of {list(survey.band_names)}")
    if len(set(bands)) != len(bands):
        raise ValueError(f"duplicate band in band_order {list(bands)}")
    return bands


def _native_stamp(cutout: Mapping[str, np.ndarray], band: str, label: str, profile: SurveyProfile) -> np.ndarray:
    if band not in cutout:
        raise PreprocessError(f"{label}: band {band} is missing (have {sorted(cutout)})")
    stamp = np.asarray(cutout[band], dtype=np.float32)  # also makes FITS big-endian data native
    if stamp.ndim != 2:
        raise PreprocessError(f"{label}: band {band} must be a 2-D image, got shape {stamp.shape}")
    problem = stamp_problem(profile.band(band), stamp.shape)
    if problem:
        raise PreprocessError(f"{label}: band {band} is {stamp.shape}, {problem}")
    bad = int(np.count_nonzero(~np.isfinite(stamp)))
    if bad:
        raise PreprocessError(f"{label}: band {band} has {bad} non-finite pixel(s); apply the NaN policy first")
    return stamp


# --------------------------------------------------------------------------------------------------
# Resampling by WCS


def wcs_disagreement(
    band_wcs: WCS,
    reference_wcs: WCS,
    band_shape: tuple[int, int],
    band_scale: float,
    reference_side: int,
    reference_scale: float,
) -> float:
    """How far (band pixels, the worst of the reference stamp's corners and centre) the WCS mapping of
    reference pixels into the band differs from the centred pixel-scale mapping ``resample_to_vis`` uses."""
    ends = np.array([0.0, (reference_side - 1) / 2, reference_side - 1.0])
    x, y = (grid.ravel() for grid in np.meshgrid(ends, ends))
    ra, dec = reference_wcs.pixel_to_world_values(x, y)
    bx, by = band_wcs.world_to_pixel_values(ra, dec)
    ratio = reference_scale / band_scale
    ex = (band_shape[1] - 1) / 2 + (x - (reference_side - 1) / 2) * ratio
    ey = (band_shape[0] - 1) / 2 + (y - (reference_side - 1) / 2) * ratio
    worst = np.max(np.abs(np.concatenate([bx - ex, by - ey])))
    return float(worst) if np.isfinite(worst) else float("inf")


def resample_by_wcs(scaled: np.ndarray, band_wcs: WCS, reference_wcs: WCS, start: int, side: int) -> np.ndarray:
    """One affinely scaled stamp (h, w) onto the ``side`` x ``side`` block of the reference grid that
    starts at pixel (``start``, ``start``), through the two WCSs (bilinear) -> float32."""
    from reproject import reproject_interp  # imported on first use: only stamps needing it pay for it

    padded = np.pad(scaled, WCS_EDGE_PAD, mode="edge")
    source = band_wcs.deepcopy()
    source.wcs.crpix = source.wcs.crpix + WCS_EDGE_PAD
    target = reference_wcs[start : start + side, start : start + side]
    out = reproject_interp((padded, source), target, shape_out=(side, side), order="bilinear", return_footprint=False)
    return np.nan_to_num(np.asarray(out, dtype=np.float32), nan=0.0)


def _wcs_members(
    members: list[int],
    band: str,
    wcs: Sequence[Mapping[str, WCS | None]] | None,
    profile: SurveyProfile,
    shape: tuple[int, int],
) -> list[int]:
    """The stamps among ``members`` (all of ``shape``) whose band and reference WCSs call for reproject."""
    if wcs is None or band == profile.reference:
        return []
    spec, reference = profile.band(band), profile.reference_band
    chosen = []
    for i in members:
        own, ref = wcs[i].get(band), wcs[i].get(profile.reference)
        if own is None or ref is None:
            continue
        gap = wcs_disagreement(own, ref, shape, spec.pixel_scale, reference.size, reference.pixel_scale)
        if gap > WCS_TOLERANCE_PX:
            chosen.append(i)
    return chosen


# --------------------------------------------------------------------------------------------------
# Cutouts


def _bin_mean(images: np.ndarray, factor: int) -> np.ndarray:
    """Block mean over factor x factor blocks of the last two axes, as a fixed-order sum of strided views
    (elementwise, so every image's result is independent of the batch it sits in)."""
    if factor == 1:
        return images
    total = np.zeros((*images.shape[:-2], images.shape[-2] // factor, images.shape[-1] // factor), np.float32)
    for dy in range(factor):
        for dx in range(factor):
            total += images[..., dy::factor, dx::factor]
    return total / np.float32(factor * factor)


def preprocess_batch(
    cutouts: Sequence[Mapping[str, np.ndarray]],
    config: PreprocessConfig,
    band_order: Sequence[str] | None = None,
    ids: Sequence[int] | None = None,
    *,
    profile: SurveyProfile | None = None,
    wcs: Sequence[Mapping[str, WCS | None]] | None = None,
) -> np.ndarray:
    """Many cutouts (band name -> native stamp) -> (N, C, S, S) of ``config.dtype``, channels in ``band_order``
    (default: all of ``profile``'s bands, in its order).

    Bit-identical to ``preprocess_cutout`` on each cutout, whatever the thread count: every step is per
    stamp (order statistics, fixed-order tap sums, elementwise ops, one reproject call per stamp), stamps
    are only grouped by shape to vectorise. ``wcs``: per cutout, band name -> celestial WCS or None (see
    the module docstring for when it is used). ``ids`` only label error messages. Bands in a cutout but
    not in ``band_order`` are ignored.
    """
    survey = _survey(profile)
    bands = _check_band_order(survey.band_names if band_order is None else band_order, survey)
    if ids is not None and len(ids) != len(cutouts):
        raise ValueError(f"{len(ids)} ids for {len(cutouts)} cutouts")
    if wcs is not None and len(wcs) != len(cutouts):
        raise ValueError(f"{len(wcs)} WCS mappings for {len(cutouts)} cutouts")
    side = output_shape(config, survey)[0] * config.bin
    reference = survey.reference_band
    start = _crop_start(reference.size, config.crop)
    stacked = np.empty((len(cutouts), len(bands), side, side), dtype=np.float32)
    labels = [f"object {ids[i]}" if ids is not None else f"cutout {i}" for i in range(len(cutouts))]
    for channel, band in enumerate(bands):
        spec = survey.band(band)
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        stamps = [_native_stamp(cutout, band, labels[i], survey) for i, cutout in enumerate(cutouts)]
        for i, stamp in enumerate(stamps):
            by_shape[stamp.shape].append(i)
        for shape, members in by_shape.items():
            native = np.stack([stamps[i] for i in members])
            scaling = band_scaling(native, config.mode, config.border, config.asinh_softening)
            by_wcs = set(_wcs_members(members, band, wcs, survey, shape))
            if spec.pixel_scale == reference.pixel_scale and shape == (reference.size, reference.size):
                scaled = _apply_affine(native[:, start : start + side, start : start + side], scaling)
            else:
                scaled = _apply_affine(native, scaling)
                scaled = resample_to_vis(
                    scaled,
                    spec.pixel_scale,
                    (reference.size, reference.size),
                    reference.pixel_scale,
                    config.upsample,
                    config.crop,
                )
            if by_wcs:  # these stamps' WCS says the centred grids are wrong: reproject them instead
                affine = _apply_affine(native, scaling)
                for k, i in enumerate(members):
                    if i in by_wcs:
                        scaled[k] = resample_by_wcs(affine[k], wcs[i][band], wcs[i][survey.reference], start, side)
            stacked[members, channel] = _stretch(scaled, scaling, config.mode)
    return _bin_mean(stacked, config.bin).astype(config.dtype, copy=False)


def preprocess_cutout(
    bands: Mapping[str, np.ndarray],
    config: PreprocessConfig,
    band_order: Sequence[str] | None = None,
    object_id: int | None = None,
    *,
    profile: SurveyProfile | None = None,
    wcs: Mapping[str, WCS | None] | None = None,
) -> np.ndarray:
    """One cutout (band name -> native stamp) -> (C, S, S) of ``config.dtype``; see ``preprocess_batch``."""
    return preprocess_batch(
        [bands],
        config,
        band_order,
        None if object_id is None else [object_id],
        profile=profile,
        wcs=None if wcs is None else [wcs],
    )[0]


# --------------------------------------------------------------------------------------------------
# Many objects, each accepted or refused by itself


class Prepared(NamedTuple):
    """``preprocess_cutouts``' result: one row per cutout (NaN where refused) and why each refused one was."""

    images: np.ndarray  # (N, C, S, S) of config.dtype
    accepted: np.ndarray  # (N,) bool
    rejects: list[Reject]  # in cutout order


def preprocess_cutouts(
    cutouts: Sequence[Cutout],
    config: PreprocessConfig,
    band_order: Sequence[str] | None = None,
    *,
    profile: SurveyProfile | None = None,
) -> Prepared:
    """Preprocess read cutouts as one batch; a cutout that cannot become an image is refused by itself.

    Reasons: ``preprocess`` (``preprocess_batch`` refuses the cutout, e.g. a band it lacks) and
    ``overflow``: a value that would be written is not finite in ``config.dtype`` (an extreme native
    pixel, e.g. 3e38, overflows the arithmetic or the cast). What is written is what is judged, so an
    extreme pixel that a mode maps into range (log, clip) is kept; inf is never written. Accepted rows
    are bit-identical to ``preprocess_batch`` (each stamp is computed by itself). ``profile``: the cutouts'
    survey (default: the challenge's); each cutout's WCS decides how its bands are resampled.
    """
    survey = _survey(profile)
    bands = _check_band_order(survey.band_names if band_order is None else band_order, survey)
    size = output_shape(config, survey)[0]
    images = np.full((len(cutouts), len(bands), size, size), np.nan, dtype=config.dtype)
    refused: dict[int, Reject] = {}
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is found below, per object, and named
        try:
            if cutouts:
                images[:] = preprocess_batch(
                    [c.bands for c in cutouts],
                    config,
                    bands,
                    [c.object_id for c in cutouts],
                    profile=survey,
                    wcs=[c.wcs for c in cutouts],
                )
        except PreprocessError:  # find which ones: one at a time
            for k, cutout in enumerate(cutouts):
                try:
                    images[k] = preprocess_cutout(
                        cutout.bands, config, bands, cutout.object_id, profile=survey, wcs=cutout.wcs
                    )
                except PreprocessError as exc:
                    refused[k] = Reject(cutout.object_id, "preprocess", str(exc))
    not_finite = ~np.isfinite(images).all(axis=(1, 2, 3))
    for k in np.flatnonzero(not_finite).tolist():
        if k not in refused:
            refused[k] = _overflow_reject(cutouts[k], images[k], bands, np.dtype(config.dtype))
            images[k] = np.nan
    accepted = np.ones(len(cutouts), dtype=bool)
    accepted[list(refused)] = False
    return Prepared(images, accepted, [refused[k] for k in sorted(refused)])


def _overflow_reject(cutout: Cutout, image: np.ndarray, bands: Sequence[str], dtype: np.dtype) -> Reject:
    """Name the band(s) whose preprocessed values are not finite, with their most extreme native pixel."""
    parts = []
    for channel, band in enumerate(bands):
        count = int(np.count_nonzero(~np.isfinite(image[channel])))
        if count:
            extreme = float(np.max(np.abs(cutout.bands[band])))
            parts.append(f"band {band}: {count} value(s) (native pixels up to {extreme:.3g})")
    message = (
        f"ID {cutout.object_id}: preprocessing gives values beyond the {dtype.name} range "
        f"(|x| <= {float(np.finfo(dtype).max):.6g}) or not finite in {'; '.join(parts)}: an extreme pixel; not written"
    )
    return Reject(cutout.object_id, "overflow", message)
