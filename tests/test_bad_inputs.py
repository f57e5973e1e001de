"""The reading side's bad-input table (README "Bad inputs"): one test per row, through the real ingest.

One bad object is rejected by itself, named with a reason, and never written; a bad catalogue fails the
run with one clear error before anything is written. Rows tested elsewhere (not repeated here):

* truncated FITS, non-FITS file, all-NaN band, missing band: ``test_pipeline.py::
  test_bad_inputs_are_rejected_recorded_and_never_written`` (through the ingest) and
  ``test_fits_io.py::test_bad_band_is_a_clear_error`` / ``test_missing_band_file`` (the reader's reasons
  and messages); NaN/inf pixels under policy ``reject``: ``test_fits_io.py`` (``nan_reject``) and
  ``test_pipeline.py::test_nan_policy_reject``.
* catalogue lines that are malformed, short or missing a column, and duplicate rows, at the parser:
  ``test_catalog.py`` (the line and column named).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from astropy.io import fits

from lensray import storage
from lensray.config import DataConfig, PreprocessConfig, SimulateConfig
from lensray.errors import CatalogError
from lensray.ingest.ingest import IngestSummary, ingest
from lensray.ingest.store import LensStore
from lensray.simulate.writer import simulate_dataset
from lensray.sky.bands import band_relpath
from lensray.sky.catalog import CATALOG_NAME, read_catalog

N_OBJECTS = 20
# The objects damaged, by position in the sorted catalogue, and the reject reason each must get.
OFFSIZE_VIS, OFFSIZE_NIR, ZERO_BYTES, THREE_D, CONSTANT, OVERFLOW, INF_PIXELS, DUPLICATE = range(8)
EXPECTED_REASONS = {
    OFFSIZE_VIS: "shape",
    OFFSIZE_NIR: "shape",
    ZERO_BYTES: "corrupt",
    THREE_D: "shape",
    CONSTANT: "constant",
    OVERFLOW: "overflow",
}


class Damaged(NamedTuple):
    root: Path
    ids: list[int]
    summary: IngestSummary
    store: LensStore
    data: DataConfig
    preprocess: PreprocessConfig

    def reject(self, position: int) -> dict[str, Any]:
        matches = [r for r in self.summary.rejects if r["id"] == self.ids[position]]
        assert len(matches) == 1, (self.ids[position], self.summary.rejects)
        return matches[0]


def _configs(images: Path, catalog: Path, store: Path) -> tuple[DataConfig, PreprocessConfig]:
    data = DataConfig(images=str(images), catalog=str(catalog))
    return data, PreprocessConfig(out=str(store), crop=100, bin=2, shard_size=5, workers=2)


def _rewrite(root: Path, band: str, object_id: int, image: np.ndarray) -> None:
    fits.writeto(root / band_relpath(band, object_id), image, overwrite=True)


def _plant(root: Path, ids: list[int]) -> None:
    """One object per bad input (only one band of it damaged), and one duplicated catalogue row."""
    vis = fits.getdata(root / band_relpath("VIS", ids[OFFSIZE_VIS])).astype(np.float32)
    _rewrite(root, "VIS", ids[OFFSIZE_VIS], vis[:150, :150])  # a 150x150 VIS stamp: the wrong size
    _rewrite(root, "J", ids[OFFSIZE_NIR], np.ones((90, 90), np.float32) + np.eye(90, dtype=np.float32))
    (root / band_relpath("Y", ids[ZERO_BYTES])).write_bytes(b"")
    _rewrite(root, "H", ids[THREE_D], np.ones((2, 66, 66), np.float32))
    _rewrite(root, "H", ids[CONSTANT], np.full((66, 66), 3e-12, np.float32))  # a blank band
    vis = fits.getdata(root / band_relpath("VIS", ids[OVERFLOW])).astype(np.float32)
    vis[100, 100] = 3e38  # finite in float32, but asinh((x - median) / sigma) overflows
    _rewrite(root, "VIS", ids[OVERFLOW], vis)
    vis = fits.getdata(root / band_relpath("VIS", ids[INF_PIXELS])).astype(np.float32)
    vis[5, 5], vis[6, 6], vis[7, 7] = np.inf, -np.inf, np.inf
    _rewrite(root, "VIS", ids[INF_PIXELS], vis)
    catalog = root / CATALOG_NAME
    lines = catalog.read_text().splitlines()
    row = next(line for line in lines if line.split(",")[1:2] == [str(ids[DUPLICATE])])
    catalog.write_text("\n".join([*lines, row]) + "\n")  # the same ID again, as the last row


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> Damaged:
    root = tmp_path_factory.mktemp("bad") / "raw"
    simulate_dataset(
        SimulateConfig(
            out=str(root),
            n=N_OBJECTS,
            seed=23,
            nan_pixel_rate=0.0,
            offsize_nir_rate=0.0,
            missing_image_rate=0.0,
            duplicate_id_rate=0.0,
        )
    )
    ids = sorted(int(i) for i in read_catalog(str(root / CATALOG_NAME)).ids)
    _plant(root, ids)
    data, preprocess = _configs(root, root / CATALOG_NAME, root.parent / "store.zarr")
    summary = ingest(data, preprocess, progress=False)
    return Damaged(root, ids, summary, LensStore.open(str(preprocess.out)), data, preprocess)


def test_every_bad_object_is_rejected_by_itself_and_the_rest_written(damaged: Damaged) -> None:
    rejected = {r["id"]: r["reason"] for r in damaged.summary.rejects}
    assert rejected == {damaged.ids[k]: reason for k, reason in EXPECTED_REASONS.items()}
    assert damaged.summary.n_written == N_OBJECTS - len(EXPECTED_REASONS)
    store = damaged.store
    images = store.read(store.indices())
    assert np.isfinite(images).all(), "a written image holds NaN/inf"
    rows = np.flatnonzero(~store.valid)
    assert np.isnan(store.read(rows, allow_invalid=True)).all(), "a rejected object was written"


def test_zero_byte_file(damaged: Damaged) -> None:
    reject = damaged.reject(ZERO_BYTES)
    assert reject["reason"] == "corrupt"
    assert f"ID {damaged.ids[ZERO_BYTES]} band Y" in reject["message"] and "0 bytes" in reject["message"]


def test_three_d_image(damaged: Damaged) -> None:
    reject = damaged.reject(THREE_D)
    assert reject["reason"] == "shape" and "band H" in reject["message"] and "3-D" in reject["message"]


def test_inf_pixels_are_zeroed_counted_and_kept(damaged: Damaged) -> None:
    store = damaged.store
    assert damaged.ids[INF_PIXELS] in set(store.ids[store.valid].tolist())
    assert store.meta["shard_stats"] == {"nan_ids": 1, "nan_pixels": 3}


def test_off_size_vis_stamp(damaged: Damaged) -> None:
    reject = damaged.reject(OFFSIZE_VIS)
    message = reject["message"]
    assert reject["reason"] == "shape"
    assert f"ID {damaged.ids[OFFSIZE_VIS]} band VIS" in message and "(150, 150)" in message and "200" in message
    assert band_relpath("VIS", damaged.ids[OFFSIZE_VIS]) in message


def test_off_size_nir_stamp_beyond_the_tolerance(damaged: Damaged) -> None:
    reject = damaged.reject(OFFSIZE_NIR)
    assert reject["reason"] == "shape" and "band J" in reject["message"] and "(90, 90)" in reject["message"]


def test_pixel_beyond_the_store_dtype_is_rejected_never_written_as_inf(damaged: Damaged) -> None:
    reject = damaged.reject(OVERFLOW)
    message = reject["message"]
    assert reject["reason"] == "overflow"
    assert f"ID {damaged.ids[OVERFLOW]}" in message and "band VIS" in message and "float16" in message
    assert "3e+38" in message


def test_constant_band_is_rejected_by_ingest_and_by_score(damaged: Damaged) -> None:
    from lensray.evaluate.score import prepare_batch

    reject = damaged.reject(CONSTANT)
    assert reject["reason"] == "constant" and "band H" in reject["message"]
    # score reads and preprocesses through the same reader: the same objects, the same reasons
    ids = np.asarray(damaged.ids[:INF_PIXELS], dtype=np.int64)
    config = damaged.preprocess.model_copy(update={"dtype": "float32"})
    batch = prepare_batch({"id": ids}, str(damaged.root), damaged.data.bands, config, damaged.data.nan)
    reasons = dict(zip(batch["id"].tolist(), batch["reason"].tolist(), strict=True))
    for position in (CONSTANT, OFFSIZE_VIS, OFFSIZE_NIR, ZERO_BYTES, THREE_D):
        assert reasons[damaged.ids[position]] == EXPECTED_REASONS[position], position
    assert reasons[damaged.ids[OVERFLOW]] == "overflow"  # never scored


def test_duplicate_catalogue_ids_are_ingested_once_and_counted(damaged: Damaged) -> None:
    assert damaged.summary.duplicate_ids == 1
    assert damaged.store.meta["duplicate_catalog_rows"] == 1
    assert damaged.store.n == N_OBJECTS
    assert damaged.store.ids.tolist().count(damaged.ids[DUPLICATE]) == 1


def _cli_preprocess(data: DataConfig, preprocess: PreprocessConfig, capsys: pytest.CaptureFixture[str]) -> str:
    from lensray.cli import main

    arguments = ["preprocess", "--images", str(data.images), "--catalog", str(data.catalog)]
    code = main([*arguments, "--out", str(preprocess.out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (bytes(range(256)) * 8, "not UTF-8"),
        (b"hello, world\nthis is, not a catalogue\n" * 20, "no header row"),
    ],
    ids=["binary", "text"],
)
def test_catalogue_garbage_fails_the_run_with_one_clear_error(
    damaged: Damaged, tmp_path: Path, content: bytes, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = tmp_path / "garbage.csv"
    catalog.write_bytes(content)
    data, preprocess = _configs(damaged.root, catalog, tmp_path / "store.zarr")
    with pytest.raises(CatalogError, match=words) as info:
        ingest(data, preprocess, progress=False)
    assert str(catalog) in str(info.value)
    err = _cli_preprocess(data, preprocess, capsys)
    assert str(catalog) in err and words in err
    assert not storage.exists(str(preprocess.out)), "nothing is written for a bad catalogue"


def test_catalogue_missing_columns_fails_the_run_naming_them(
    damaged: Damaged, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (damaged.root / CATALOG_NAME).read_text().splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith(",ID,"))
    keep = [k for k, name in enumerate(lines[header].split(",")) if name not in ("mag_eff", "n_pix_source")]
    cut = [",".join(line.split(",")[k] for k in keep) if n >= header else line for n, line in enumerate(lines)]
    catalog = tmp_path / "cut.csv"
    catalog.write_text("\n".join(cut) + "\n")
    data, preprocess = _configs(damaged.root, catalog, tmp_path / "store.zarr")
    with pytest.raises(CatalogError, match=r"lacks column\(s\) n_pix_source, mag_eff"):
        ingest(data, preprocess, progress=False)
    err = _cli_preprocess(data, preprocess, capsys)
    assert str(catalog) in err and "mag_eff" in err
    assert not storage.exists(str(preprocess.out))
