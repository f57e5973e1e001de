"""Catalogue reading (header by content, typed columns, clear errors, duplicates), the label rules, and any\ntable (CSV, FITS, ECSV, Parquet) with its ID, label, coordinate and kept columns named in DataConfig."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table

from lensray import storage
from lensray.config import ConfigError, DataConfig, config_from_dict
from lensray.errors import LensrayError
from lensray.sky.catalog import (
    CATALOG_NAME,
    COLUMNS,
    INT_COLUMNS,
    CatalogError,
    apply_label_rule,
    catalog_format,
    label_counts,
    label_ids,
    load_catalog,
    parse_catalog,
    read_catalog,
)


def row_values(object_id: int, **overrides: object) -> dict[str, object]:
    """A plausible catalogue row; every value differs with the ID so that mix-ups show."""
    values: dict[str, object] = {name: round(0.5 + 0.01 * (object_id % 97) + k, 4) for k, name in enumerate(COLUMNS)}
    for name in INT_COLUMNS - {"ID"}:
        values[name] = object_id % 7 + len(name)
    values["ID"] = object_id
    values.update(overrides)
    return values


def catalog_text(rows: list[dict[str, object]], comments: list[str], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = [*comments, "," + ",".join(columns)]
    for index, row in enumerate(rows):
        lines.append(",".join([str(index), *(str(row[name]) for name in columns)]))
    return "\n".join(lines) + "\n"


def comment_block(n: int) -> list[str]:
    return [f"# {COLUMNS[k % len(COLUMNS)]}: description of field {k}, in units" for k in range(n)]


@pytest.mark.parametrize("n_comments", [0, 3, 28])
def test_header_found_after_any_comment_block(n_comments: int, tmp_path: Path) -> None:
    rows = [row_values(200001 + k) for k in range(5)]
    url = str(tmp_path / CATALOG_NAME)
    storage.write_bytes(url, catalog_text(rows, comment_block(n_comments)).encode())
    catalog = read_catalog(url)
    assert list(catalog.table.columns) == list(COLUMNS)
    assert catalog.ids.tolist() == [200001 + k for k in range(5)]
    assert catalog.lines.tolist() == [n_comments + 2 + k for k in range(5)]
    assert catalog.table["ID"].dtype == np.int64
    assert catalog.table["n_pix_source"].dtype == np.int64 and catalog.table["n_sources"].dtype == np.int64
    assert catalog.table["mag_eff"].dtype == np.float64 and catalog.table["mag_lens"].dtype == np.float64
    assert catalog.table["mag_eff"].tolist() == [r["mag_eff"] for r in rows]
    assert catalog.table["n_source_im"].tolist() == [r["n_source_im"] for r in rows]
    assert catalog.duplicates == ()


def test_header_found_after_prose_without_hash_marks() -> None:
    prose = [
        "Catalogue of the Bologna lens challenge 2.0",
        "ID, the object's number",
        "mag_eff, effective magnification",
        "",
    ]
    catalog = parse_catalog(catalog_text([row_values(7), row_values(8)], prose))
    assert catalog.ids.tolist() == [7, 8]


def test_reads_from_s3(s3_bucket: str) -> None:
    url = storage.join(s3_bucket, "Public", CATALOG_NAME)
    storage.write_bytes(url, catalog_text([row_values(200001), row_values(200002)], comment_block(4)).encode())
    assert read_catalog(url).ids.tolist() == [200001, 200002]


def test_integer_valued_floats_accepted_in_count_columns() -> None:
    catalog = parse_catalog(catalog_text([row_values(1, n_pix_source="21.0", mag_eff="nan")], []))
    assert catalog.table["n_pix_source"].tolist() == [21]
    assert math.isnan(catalog.table["mag_eff"].iloc[0])


def test_missing_column_is_named_with_the_url(tmp_path: Path) -> None:
    columns = tuple(c for c in COLUMNS if c != "mag_eff")
    url = str(tmp_path / CATALOG_NAME)
    storage.write_bytes(url, catalog_text([row_values(1)], comment_block(2), columns).encode())
    with pytest.raises(CatalogError, match=rf"{CATALOG_NAME}.*line 3.*lacks column\(s\) mag_eff$"):
        read_catalog(url)


def test_no_header_at_all() -> None:
    with pytest.raises(CatalogError, match="no header row"):
        parse_catalog("# just a comment\n1,2,3\n", "cat.csv")


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"mag_eff": "abc"}, r"cat\.csv, line 6, column mag_eff: 'abc' is not a number"),
        ({"z_lens": ""}, r"cat\.csv, line 6, column z_lens: '' is not a number"),
        ({"n_pix_source": "20.5"}, r"cat\.csv, line 6, column n_pix_source: '20.5' is not an integer"),
        ({"ID": "nan"}, r"cat\.csv, line 6, column ID: 'nan' is not an integer"),
        ({"color_diff": "1,2"}, r"cat\.csv, line 6: 28 fields, the header \(line 3\) has 27"),
    ],
)
def test_malformed_row_names_line_and_column(override: dict[str, object], pattern: str) -> None:
    rows = [row_values(1), row_values(2), row_values(3, **override), row_values(4)]
    with pytest.raises(CatalogError, match=pattern):
        parse_catalog(catalog_text(rows, comment_block(2)), "cat.csv")


def test_short_row_names_its_line() -> None:
    text = catalog_text([row_values(1), row_values(2)], comment_block(1))
    lines = text.splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]  # drop the last field of the first row
    with pytest.raises(CatalogError, match=r"line 3: 26 fields, the header \(line 2\) has 27"):
        parse_catalog("\n".join(lines), "cat.csv")


def test_duplicate_ids_first_kept_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        row_values(10, mag_eff=1.0),
        row_values(11),
        row_values(10, mag_eff=9.0),
        row_values(12),
        row_values(11),
        row_values(10, mag_eff=7.0),
    ]
    with caplog.at_level(logging.WARNING, logger="lensray.sky.catalog"):
        catalog = parse_catalog(catalog_text(rows, comment_block(3)), "cat.csv")
    assert catalog.ids.tolist() == [10, 11, 12]
    assert catalog.table["mag_eff"].iloc[0] == 1.0  # the first occurrence's values
    assert catalog.lines.tolist() == [5, 6, 8]
    assert [(d.object_id, d.line, d.kept_line) for d in catalog.duplicates] == [(10, 7, 5), (11, 9, 6), (10, 10, 5)]
    assert catalog.duplicate_ids() == {10: [5, 7, 10], 11: [6, 9]}
    assert "3 duplicate row(s) of 2 ID(s)" in caplog.text and "cat.csv" in caplog.text


# Hand-checked: (ID, n_sources, n_source_im, mag_eff, n_pix_source) -> paper, official, challenge labels
# (None = excluded by the official rule). Boundaries: mag_eff 1.2 / 1.6 / 2.0, n_pix_source 20.
LABEL_TABLE = [
    (305, 1, 1, 2.01, 20, 1, 1, 0),  # n_pix_source = 20 is not > 20
    (301, 0, 0, 0.0, 0, 0, 0, 0),
    (302, 1, 1, 1.2, 50, 1, None, 0),  # 1.2 is not < 1.2 and not > 2
    (303, 1, 1, 1.19, 50, 1, 0, 0),
    (304, 2, 2, 1.6, 50, 1, None, 0),  # 1.6 is not > 1.6
    (308, 2, 2, 1.61, 21, 1, None, 1),
    (306, 1, 1, 2.0, 50, 1, None, 1),  # 2.0 is not > 2
    (307, 3, 0, 5.0, 100, 1, 1, 0),  # no source images
    (309, 0, 1, 3.0, 30, 0, None, 1),  # official: mag_eff > 2 yet n_sources == 0 -> undecidable
    (310, 1, 1, float("nan"), 50, 1, None, 0),
    (311, 0, 0, 1.5, 0, 0, 0, 0),
]


@pytest.fixture()
def label_catalog():
    rows = [
        row_values(i, n_sources=ns, n_source_im=nsi, mag_eff=me, n_pix_source=npx)
        for i, ns, nsi, me, npx, *_ in LABEL_TABLE
    ]
    return parse_catalog(catalog_text(rows, comment_block(1)), "labels.csv")


@pytest.mark.parametrize(("rule", "column"), [("paper", 5), ("official", 6), ("challenge", 7)])
def test_label_rules_on_hand_checked_table(label_catalog, rule: str, column: int) -> None:
    expected = {entry[0]: entry[column] for entry in LABEL_TABLE}
    labelled = apply_label_rule(label_catalog, rule)
    assert labelled.rule == rule
    assert labelled.ids.dtype == np.int64 and labelled.labels.dtype == np.int8
    assert labelled.ids.tolist() == sorted(i for i, label in expected.items() if label is not None)
    assert dict(zip(labelled.ids.tolist(), labelled.labels.tolist(), strict=False)) == {
        i: v for i, v in expected.items() if v is not None
    }
    assert [e.object_id for e in labelled.excluded] == sorted(i for i, v in expected.items() if v is None)
    lenses = sum(1 for v in expected.values() if v == 1)
    assert label_counts(labelled) == {
        "lens": lenses,
        "non_lens": sum(1 for v in expected.values() if v == 0),
        "excluded": sum(1 for v in expected.values() if v is None),
    }


def test_official_exclusions_say_why(label_catalog) -> None:
    reasons = {e.object_id: e.reason for e in apply_label_rule(label_catalog, "official").excluded}
    assert "1.2 <= mag_eff <= 2" in reasons[302]
    assert "contradictory" in reasons[309]
    assert "NaN" in reasons[310]


def test_unknown_rule_is_refused(label_catalog) -> None:
    with pytest.raises(ValueError, match="unknown label rule 'kaggle'"):
        apply_label_rule(label_catalog, "kaggle")  # type: ignore[arg-type]


# --- any catalogue (CSV, FITS, ECSV, Parquet) with the columns DataConfig names ----------------------

CUSTOM = DataConfig(
    id_column="objid",
    label_column="is_lens",
    coord_columns=("RA_deg", "DEC_deg"),
    keep_columns=("mag_r", "field"),
)
ASTROPY_FORMAT = {"csv": "ascii.csv", "fits": "fits", "ecsv": "ascii.ecsv", "parquet": "parquet"}


def survey_table(**columns: object) -> Table:
    """Four objects as a survey keeps them (objid 1237... does not fit a float64); the last repeats objid 12."""
    table = Table(
        {
            "objid": np.array([1237648720693755918, 12, 7, 12], dtype=np.int64),
            "is_lens": [True, False, True, False],
            "RA_deg": np.array([150.1, 0.0, 359.5, 10.0]) * u.deg,
            "DEC_deg": [2.2, -89.9, 30.0, 1.0],
            "mag_r": [21.5, 22.25, 19.0, 23.0],
            "field": ["COSMOS", "XMM", "COSMOS", "XMM"],
        }
    )
    for name, values in columns.items():
        table[name] = values
    return table


def write_table(table: Table, path: Path) -> str:
    fmt = ASTROPY_FORMAT.get(path.suffix.lstrip("."), "ascii.csv")
    table.write(path, format=fmt, overwrite=True)
    return str(path)


@pytest.mark.parametrize("ext", ["csv", "fits", "ecsv", "parquet"])
def test_every_format_reads_identically(ext: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = write_table(survey_table(), tmp_path / f"survey.{ext}")
    with caplog.at_level(logging.WARNING, logger="lensray.sky.catalog"):
        catalog = load_catalog(url, CUSTOM)
    assert catalog.ids.tolist() == [1237648720693755918, 12, 7]  # file order, exact, the repeat dropped
    assert [(d.object_id, d.line, d.kept_line) for d in catalog.duplicates] == [(12, 4, 2)]
    assert "12 (data row 4, kept data row 2)" in caplog.text
    labelled = label_ids(catalog, CUSTOM)
    assert labelled.rule == "column:is_lens" and labelled.excluded == ()
    assert labelled.ids.tolist() == [7, 12, 1237648720693755918] and labelled.labels.tolist() == [1, 0, 1]
    columns = catalog.candidate_columns()
    assert list(columns.columns) == ["id", "ra", "dec", "mag_r", "field"]
    assert columns["ra"].tolist() == [150.1, 0.0, 359.5] and columns["dec"].tolist() == [2.2, -89.9, 30.0]
    assert columns["mag_r"].tolist() == [21.5, 22.25, 19.0] and columns["field"].tolist() == ["COSMOS", "XMM", "COSMOS"]


def test_format_from_the_option_and_angle_units(tmp_path: Path) -> None:
    table = survey_table(RA_deg=np.array([0.5, 0.0, 1.0, 0.1]) * u.rad, DEC_deg=np.array([60.0, 0, -30, 0]) * u.arcmin)
    url = write_table(table, tmp_path / "survey.fits")
    renamed = tmp_path / "survey.dat"  # an extension that says nothing: the option decides
    renamed.write_bytes(Path(url).read_bytes())
    assert catalog_format(str(renamed)) == "csv" and catalog_format("s3://b/x.fits.gz") == "fits"
    catalog = load_catalog(str(renamed), CUSTOM.model_copy(update={"catalog_format": "fits"}))
    np.testing.assert_allclose(catalog.candidate_columns()["ra"], np.degrees([0.5, 0.0, 1.0]))
    np.testing.assert_allclose(catalog.candidate_columns()["dec"], [1.0, 0.0, -0.5])


def test_label_text_and_numbers(tmp_path: Path) -> None:
    for values in (["1", "0", "TRUE", "false"], [1, 0, 1, 0], [1.0, 0.0, 1.0, 0.0]):
        url = write_table(survey_table(is_lens=values), tmp_path / "labels.ecsv")
        assert label_ids(load_catalog(url, CUSTOM), CUSTOM).labels.tolist() == [1, 0, 1]


def test_the_challenge_csv_reads_as_before(tmp_path: Path) -> None:
    rows = [row_values(200001 + k, n_sources=k % 2) for k in range(6)] + [row_values(200002)]
    url = str(tmp_path / CATALOG_NAME)
    storage.write_bytes(url, catalog_text(rows, comment_block(5)).encode())
    before = read_catalog(url)
    for rule in ("paper", "official", "challenge"):
        data = DataConfig(labels=rule)
        catalog = load_catalog(url, data)
        assert catalog.challenge and catalog.duplicates == before.duplicates
        assert catalog.lines.tolist() == before.lines.tolist()
        assert catalog.table.equals(before.table)
        labelled, expected = label_ids(catalog, data), apply_label_rule(before, rule)
        assert labelled.rule == rule and labelled.excluded == expected.excluded
        assert labelled.ids.tolist() == expected.ids.tolist() and labelled.labels.tolist() == expected.labels.tolist()


def test_an_unlabelled_catalogue_is_all_minus_one(tmp_path: Path) -> None:
    url = write_table(survey_table(), tmp_path / "survey.parquet")
    data = DataConfig(id_column="objid")
    labelled = label_ids(load_catalog(url, data), data)
    assert labelled.rule == "unlabelled" and labelled.labels.tolist() == [-1, -1, -1]
    assert label_counts(labelled) == {"lens": 0, "non_lens": 0, "excluded": 0, "unlabelled": 3}


@pytest.mark.parametrize(
    ("table_columns", "data", "pattern"),
    [
        ({}, {"id_column": "ID"}, r"survey\.fits: no ID column 'ID' \(columns: objid, is_lens,"),
        ({}, {"coord_columns": ("ra", "DEC_deg")}, r"survey\.fits: no RA column 'ra'"),
        ({}, {"keep_columns": ("mag_r", "z_phot")}, r"survey\.fits: no kept column 'z_phot'"),
        ({}, {"label_column": "lens"}, r"survey\.fits: no label column 'lens'"),
        (
            {"objid": [1.0, 2.5, 3.0, 4.0]},
            {},
            r"survey\.fits, column objid: data row 2 is 2\.5, not an integer",
        ),
        (
            {"is_lens": [1, 0, 2, 0]},
            {},
            r"survey\.fits, column is_lens: ID 7 \(data row 3\) has label 2; labels must be 1/0 or true/false",
        ),
        (
            {"DEC_deg": [2.2, -91.0, 0.0, 0.0]},
            {},
            r"survey\.fits, column DEC_deg: ID 12 \(data row 2\) has Dec -91\.0; degrees in \[-90, 90\]",
        ),
        ({"objid": [[1, 2]] * 4}, {}, r"survey\.fits, column objid: 2-D values"),
    ],
)
def test_column_errors_name_the_file_and_column(
    table_columns: dict[str, object], data: dict[str, object], pattern: str, tmp_path: Path
) -> None:
    url = write_table(survey_table(**table_columns), tmp_path / "survey.fits")
    with pytest.raises(LensrayError, match=pattern):
        load_catalog(url, CUSTOM.model_copy(update=data))


def test_missing_values_are_named(tmp_path: Path) -> None:
    text = "objid,is_lens\n5,1\n,0\n"
    (tmp_path / "ids.csv").write_text(text)
    with pytest.raises(CatalogError, match=r"ids\.csv, column objid: data row 2 is empty, not an integer"):
        load_catalog(str(tmp_path / "ids.csv"), DataConfig(id_column="objid"))
    (tmp_path / "labels.csv").write_text("objid,is_lens\n5,1\n6,\n")
    with pytest.raises(CatalogError, match=r"labels\.csv, column is_lens: ID 6 \(data row 2\) has label"):
        load_catalog(str(tmp_path / "labels.csv"), DataConfig(id_column="objid", label_column="is_lens"))


@pytest.mark.parametrize("ext", ["fits", "parquet", "ecsv", "csv"])
def test_an_unreadable_table_is_one_error_naming_the_file(ext: str, tmp_path: Path) -> None:
    path = tmp_path / f"broken.{ext}"
    path.write_bytes(b"objid,is_lens\n1,2,3\n" if ext == "csv" else b"\x00\x01 not a table at all")
    with pytest.raises(CatalogError, match=rf"catalogue {path}: not a readable {ext} table"):
        load_catalog(str(path), DataConfig(id_column="objid"))


def test_kept_columns_cannot_take_candidate_names() -> None:
    with pytest.raises(ConfigError, match="data.keep_columns.*would overwrite candidate columns"):
        config_from_dict({"data": {"keep_columns": ["mag", "score"]}})
    with pytest.raises(ConfigError, match="data.coord_columns"):
        config_from_dict({"data": {"coord_columns": ["ra"]}})
