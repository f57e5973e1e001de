"""Open one object's band cutouts (FITS) from a local or object-storage root, laid out as a survey
profile says (``lensray.profiles``: default ``euclid_challenge``, a file per band with the image in HDU 0).

A band's file is ``profile.relpath(band, id)`` under the images root and its image the band's ``hdu``
(index or EXTNAME). Bands that share a file (one multi-extension FITS per object, as Euclid MER and many
cutout services deliver) are read from ONE download of its bytes. gzip files (``.fits.gz``, found by
their magic bytes) are decompressed first; fpack ``.fz`` tile-compressed images (``CompImageHDU``, the
image in HDU 1) are decompressed by astropy. Each band keeps its celestial WCS (``astropy.wcs.WCS`` when
the header has celestial axes, else None) for ``ingest.preprocess`` to resample by.

A bad object is a ``CutoutError`` naming its ID, band and URL, with a short machine-readable reason,
so that an ingest can reject it and go on. A storage failure that is not about one object (missing
bucket, refused credentials, endpoint down) is a ``StorageError`` and is never turned into a
rejection: otherwise a typo in a bucket name would "reject" every object instead of failing the run.
NaN pixels are never silently zeroed: policy ``zero`` sets them to 0 and counts them, ``reject``
rejects the object; an image with no finite non-zero pixel, or whose finite pixels all hold one value
(a blank band), is always rejected, and so is a stamp whose shape does not fit its band's ``size`` and
``size_tolerance`` (``bands.stamp_problem``); a file without the band's HDU is rejected with reason ``hdu``.
Ingest and score read through here, so both reject the same objects for the same reasons.
"""

from __future__ import annotations

import functools
import gzip
import io
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from lensray import storage
from lensray.errors import LensrayError
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile
from lensray.sky.bands import stamp_problem

NanPolicy = Literal["zero", "reject"]
RejectReason = Literal["missing", "hdu", "corrupt", "empty", "all_nan", "constant", "nan", "shape"]
NAN_POLICIES: tuple[str, ...] = ("zero", "reject")
GZIP_MAGIC = b"\x1f\x8b"


class CutoutError(LensrayError, ValueError):
    """One object's band is unusable. ``reason``: missing (no file), hdu (no such HDU in the file), corrupt,
    empty, all_nan, constant, nan or shape."""

    def __init__(self, object_id: int, band: str, url: str, reason: RejectReason, detail: str) -> None:
        self.object_id = int(object_id)
        self.band = band
        self.url = url
        self.reason = reason
        self.detail = detail
        super().__init__(f"ID {self.object_id} band {band} ({url}): {reason}: {detail}")


class Reject(NamedTuple):
    """An object ``read_cutouts`` left out; ``str()`` is the full message."""

    object_id: int
    reason: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Cutout:
    """One object's bands at their native shapes (float32), how many NaN pixels each had, and each band's
    celestial WCS (None where its header has none)."""

    object_id: int
    bands: dict[str, np.ndarray]
    nan_pixels: dict[str, int]  # non-finite pixels set to 0 under policy "zero"; 0 otherwise
    wcs: dict[str, WCS | None] = field(default_factory=dict)  # a band absent here has no WCS

    @property
    def total_nan_pixels(self) -> int:
        return sum(self.nan_pixels.values())


def _profile(profile: SurveyProfile | None) -> SurveyProfile:
    return PROFILES[DEFAULT_PROFILE] if profile is None else profile


def decode_band(data: bytes, object_id: int, band: str, url: str, nan_policy: NanPolicy) -> tuple[np.ndarray, int]:
    """FITS bytes -> (2-D float32 image of HDU 0 with NaNs handled by the policy, number of NaN pixels)."""
    image, n_bad, _ = decode_hdus(data, object_id, url, {band: 0}, nan_policy)[band]
    return image, n_bad


def decode_hdus(
    data: bytes, object_id: int, url: str, hdus: dict[str, int | str], nan_policy: NanPolicy
) -> dict[str, tuple[np.ndarray, int, WCS | None]]:
    """One file's bytes -> per band (``hdus``: band -> HDU index or EXTNAME) its (image, NaN count, WCS).

    The file is parsed once whatever the number of bands in it. gzip bytes are decompressed first.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    first = next(iter(hdus))

    def fail(band: str, reason: RejectReason, detail: str) -> CutoutError:
        return CutoutError(object_id, band, url, reason, detail)

    if not data:
        raise fail(first, "corrupt", "file is empty (0 bytes)")
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise fail(first, "corrupt", f"not a readable gzip file ({type(exc).__name__}: {exc})") from exc
    out: dict[str, tuple[np.ndarray, int, WCS | None]] = {}
    band = first
    try:
        with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=True) as hdul:
            for band, which in hdus.items():
                image, header = _hdu_image(hdul, data, which, functools.partial(fail, band))
                out[band] = (*check_image(image, object_id, band, url, nan_policy, hdu=which), _celestial(header))
    except CutoutError:
        raise
    except Exception as exc:  # any parse failure of these bytes means the file is not usable FITS
        raise fail(band, "corrupt", f"not a readable FITS file ({type(exc).__name__}: {exc})") from exc
    return out


def _hdu_image(
    hdul: fits.HDUList, data: bytes, which: int | str, fail: Callable[[RejectReason, str], CutoutError]
) -> tuple[np.ndarray, fits.Header]:
    """The image array and header of HDU ``which``; CutoutError (hdu, empty, corrupt) when there is none."""
    try:
        hdu = hdul[which]
    except (KeyError, IndexError):
        names = ", ".join(_hdu_names(hdul))
        raise fail("hdu", f"no HDU {which!r} (HDUs: {names})") from None
    if hdu.header.get("NAXIS", 0) == 0 or hdu.size == 0:
        raise fail("empty", f"HDU {which} holds no image data ({_count_hdus(hdul)} HDU(s) in the file)")
    if not isinstance(hdu, fits.CompImageHDU):  # a compressed HDU's truncation fails its decompression
        index = hdul.index_of(which) if isinstance(which, str) else which
        needed = hdul.fileinfo(index)["datLoc"] + hdu.size
        if len(data) < needed:
            raise fail("corrupt", f"truncated: {len(data)} bytes, the header needs {needed}")
    return np.asarray(hdu.data, dtype=np.float32), hdu.header  # native byte order


def _celestial(header: fits.Header) -> WCS | None:
    """The header's celestial WCS, or None (no CTYPE: no WCS, without the cost of parsing one)."""
    if "CTYPE1" not in header and "CTYPE1A" not in header:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception:  # an unparsable WCS is as good as none: the pixel-scale ratio is used
            return None
    return wcs.celestial if wcs.has_celestial else None


def _hdu_names(hdul: fits.HDUList) -> list[str]:
    names = []
    for k in range(_count_hdus(hdul)):
        try:
            names.append(hdul[k].name or str(k))
        except Exception:  # a damaged trailing HDU; the list is only for the message
            break
    return names


def check_image(
    image: np.ndarray, object_id: int, band: str, url: str, nan_policy: NanPolicy, *, hdu: int | str = 0
) -> tuple[np.ndarray, int]:
    """A decoded image -> (2-D float32 image with NaNs handled by the policy, number of NaN pixels), or the
    CutoutError that rejects it (not 2-D, all NaN, all zero, blank, NaN under ``reject``). ``url`` names
    where the pixels came from in the message, ``hdu`` which HDU of it."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")

    def fail(reason: RejectReason, detail: str) -> CutoutError:
        return CutoutError(object_id, band, url, reason, detail)

    image = np.array(image, dtype=np.float32)  # a copy: NaNs are zeroed in place below
    if image.ndim != 2:
        raise fail("shape", f"HDU {hdu} image is {image.ndim}-D {image.shape}, expected 2-D")
    bad = ~np.isfinite(image)  # +-inf is as unusable as NaN
    n_bad = int(bad.sum())
    if n_bad == image.size:
        raise fail("all_nan", f"all {image.size} pixels are NaN/inf")
    finite = image[~bad]
    if not np.any(finite):
        raise fail("empty", f"every finite pixel is 0 ({n_bad} NaN/inf, {image.size - n_bad} zero)")
    if finite.min() == finite.max():  # a blank band (a filled gap, a dead read-out): no sky in it at all
        raise fail("constant", f"every finite pixel is {finite[0]:.6g} ({n_bad} NaN/inf): a blank band")
    if n_bad:
        if nan_policy == "reject":
            raise fail("nan", f"{n_bad} of {image.size} pixels are NaN/inf (nan policy 'reject')")
        image[bad] = 0.0
    return image, n_bad


def _count_hdus(hdul: fits.HDUList) -> int:
    try:
        return len(hdul)
    except Exception:  # a damaged trailing HDU; the count is only for the message
        return 1


def band_url(root_url: str, object_id: int, band: str, profile: SurveyProfile | None = None) -> str:
    """Where ``band`` of ``object_id`` lives under ``root_url`` in ``profile``'s layout (default: challenge)."""
    return storage.join(root_url, _profile(profile).relpath(band, object_id))


def read_band(
    root_url: str, object_id: int, band: str, nan_policy: NanPolicy, profile: SurveyProfile | None = None
) -> tuple[np.ndarray, int]:
    """One band of one object. CutoutError for a bad object, StorageError for unreachable storage."""
    cutout = read_cutout(root_url, object_id, (band,), nan_policy, profile=profile)
    return cutout.bands[band], cutout.nan_pixels[band]


def read_cutout(
    root_url: str,
    object_id: int,
    bands: Sequence[str],
    nan_policy: NanPolicy = "zero",
    *,
    profile: SurveyProfile | None = None,
) -> Cutout:
    """All requested bands of one object, native shapes kept (resampling is ``ingest.preprocess``'s job).

    Bands in one file are decoded from one read of it; files are read in the bands' order, so the first
    bad band (in that order) names the object's reject.
    """
    if not bands:
        raise ValueError("at least one band is required")
    survey = _profile(profile)
    files: dict[str, dict[str, int | str]] = {}
    for band in bands:
        files.setdefault(band_url(root_url, object_id, band, survey), {})[band] = survey.band(band).hdu
    decoded: dict[str, tuple[np.ndarray, int, WCS | None]] = {}
    for url, hdus in files.items():
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            raise CutoutError(object_id, next(iter(hdus)), url, "missing", "no such file") from None
        for band, result in decode_hdus(data, object_id, url, hdus, nan_policy).items():
            problem = stamp_problem(survey.band(band), result[0].shape)
            if problem:  # a wrong-size stamp is this object's fault, not the run's
                raise CutoutError(object_id, band, url, "shape", f"stamp is {result[0].shape}, {problem}")
            decoded[band] = result
    return Cutout(
        object_id=int(object_id),
        bands={band: decoded[band][0] for band in bands},
        nan_pixels={band: decoded[band][1] for band in bands},
        wcs={band: decoded[band][2] for band in bands},
    )


def read_cutouts(
    root_url: str,
    ids: Sequence[int],
    bands: Sequence[str],
    nan_policy: NanPolicy = "zero",
    *,
    threads: int | None = None,
    profile: SurveyProfile | None = None,
) -> tuple[list[Cutout], list[Reject]]:
    """The good cutouts (in ``ids`` order) and one Reject per bad object; one bad object never stops the rest.

    Unreachable storage raises StorageError at once (checked before the first read). ``threads``
    ``profile`` is the files' layout (default: the challenge's). ``threads`` overlaps object-store latency (default: 8 for object storage, 1 for local paths, where parsing
    under the GIL dominates and threads measured ~10 % slower).
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    storage.check_reachable(root_url)
    if threads is None:
        threads = 1 if storage.is_local(root_url) else 8

    def attempt(object_id: int) -> Cutout | Reject:
        try:
            return read_cutout(root_url, object_id, bands, nan_policy, profile=profile)
        except CutoutError as err:
            return Reject(err.object_id, err.reason, str(err))

    if threads > 1 and len(ids) > 1:
        pool = ThreadPoolExecutor(max_workers=min(threads, len(ids)))
        try:
            results = list(pool.map(attempt, ids))
        finally:  # on a StorageError, do not wait for every queued read to fail the same way
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        results = [attempt(object_id) for object_id in ids]
    cutouts = [r for r in results if isinstance(r, Cutout)]
    rejects = [r for r in results if isinstance(r, Reject)]
    return cutouts, rejects
