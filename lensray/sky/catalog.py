"""Catalogues: the challenge CSV (its label rules paper/official/challenge) and any table an astronomer keeps.

The challenge file is comma-separated: a comment block describing the fields, a header row of 27 columns
(the first an unnamed row index) and the rows. The header is found by its content, never by a fixed skip
count, because the comment block's length differs between releases. Every problem is an error naming
the URL, the line in the file and the column; duplicate IDs are reported and the first row kept.

Any other catalogue (CSV, FITS, ECSV, Parquet, read by ``astropy.table``) is read by ``load_catalog``
with the columns ``DataConfig`` names: integer IDs, optionally 0/1 labels, (ra, dec) and columns kept for
the candidates. Without a label column it is unlabelled (-1): it ingests and scores, it cannot train.
The challenge CSV is one case of it: found by its header, read and labelled exactly as before.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, get_args

import numpy as np
import pandas as pd

from lensray import storage
from lensray.config import DataConfig, LabelRule
from lensray.errors import CatalogError

log = logging.getLogger(__name__)

CATALOG_NAME = "image_catalog2.0train.csv"

# The 26 named columns after the unnamed row index (27 columns in all), in file order.
COLUMNS: tuple[str, ...] = (
    "ID",
    "x_crit",
    "y_crit",
    "source_ID",
    "z_source",
    "z_lens",
    "mag_source",
    "ein_area",
    "n_crit",
    "r_source",
    "crit_area",
    "n_pix_source",
    "source_flux",
    "n_pix_lens",
    "lens_flux",
    "n_source_im",
    "mag_eff",
    "sb_contrast",
    "color_diff",
    "n_gal_3",
    "n_gal_5",
    "n_gal_10",
    "halo_mass",
    "star_mass",
    "mag_lens",
    "n_sources",
)

# Identifiers and counts are integers (ID int64); everything else is float64.
INT_COLUMNS: frozenset[str] = frozenset(
    {
        "ID",
        "source_ID",
        "n_crit",
        "n_pix_source",
        "n_pix_lens",
        "n_source_im",
        "n_gal_3",
        "n_gal_5",
        "n_gal_10",
        "n_sources",
    }
)
LABEL_RULES: tuple[str, ...] = get_args(LabelRule)


class DroppedDuplicate(NamedTuple):
    """A catalogue row dropped because an earlier row (``kept_line``) has the same ID."""

    object_id: int
    line: int  # 1-based line in the file
    kept_line: int


@dataclass(frozen=True)
class Catalog:
    """The catalogue's rows (one per ID, file order) and what was dropped to get there."""

    url: str
    table: pd.DataFrame  # challenge: COLUMNS (+ any extra named ones); other tables: the columns asked for
    lines: np.ndarray  # int64: the file line (1-based) of each row of ``table``, or its data row (``row_word``)
    duplicates: tuple[DroppedDuplicate, ...]  # one entry per dropped row
    id_column: str = "ID"
    challenge: bool = True  # the challenge CSV layout, which the label rules apply to
    row_word: str = "line"  # what ``lines`` counts: "line" (challenge CSV) or "data row" (any table)
    label_column: str | None = None  # int8 0/1 once read
    coord_columns: tuple[str, str] | None = None  # float64 degrees once read
    keep_columns: tuple[str, ...] = ()

    @property
    def ids(self) -> np.ndarray:
        return self.table[self.id_column].to_numpy(dtype=np.int64)

    def where(self, row: int) -> str:
        """``"line 7"`` / ``"data row 3"``: where row ``row`` of ``table`` is in the file."""
        return f"{self.row_word} {int(self.lines[row])}"

    def candidate_columns(self) -> pd.DataFrame:
        """``id``, ``ra``, ``dec`` (with coord_columns) and the kept columns, one row per ID, for candidates."""
        columns: dict[str, Any] = {"id": self.ids}
        if self.coord_columns is not None:
            columns["ra"] = self.table[self.coord_columns[0]].to_numpy(dtype=np.float64)
            columns["dec"] = self.table[self.coord_columns[1]].to_numpy(dtype=np.float64)
        for name in self.keep_columns:
            columns[name] = self.table[name].array  # nullable integers stay integers
        return pd.DataFrame(columns)

    def __len__(self) -> int:
        return len(self.table)

    def duplicate_ids(self) -> dict[int, list[int]]:
        """Duplicated ID -> every line it appears on (the first kept)."""
        found: dict[int, list[int]] = {}
        for dup in self.duplicates:
            found.setdefault(dup.object_id, [dup.kept_line]).append(dup.line)
        return found


class Exclusion(NamedTuple):
    object_id: int
    reason: str


@dataclass(frozen=True)
class LabelledIDs:
    """IDs with a label under one rule (sorted by ID), and the IDs the rule leaves out, with why.

    ``rule``: a challenge label rule, ``"column:<name>"`` or ``"unlabelled"`` (every label -1).
    """

    rule: str
    ids: np.ndarray  # int64, sorted
    labels: np.ndarray  # int8, 1 = lens, 0 = non-lens, -1 = unknown (unlabelled catalogue)
    excluded: tuple[Exclusion, ...]

    def __len__(self) -> int:
        return len(self.ids)


def _closest_header(lines: list[str]) -> tuple[int, int, list[str]] | None:
    """``(matches, index, fields)`` of the first line naming every column in COLUMNS, else of the line
    naming the most of them; None when no line names any."""
    best: tuple[int, int, list[str]] | None = None
    for index, line in enumerate(lines):
        fields = [f.strip() for f in next(csv.reader([line]), [])]
        present = set(fields)
        matches = sum(name in present for name in COLUMNS)
        if matches == len(COLUMNS):
            return matches, index, fields
        if matches and (best is None or matches > best[0]):
            best = (matches, index, fields)
    return best


def _find_header(lines: list[str], url: str) -> tuple[int, list[str]]:
    """Index and fields of the first line whose fields include every name in COLUMNS."""
    best = _closest_header(lines)
    if best is not None and best[0] == len(COLUMNS):
        return best[1], best[2]
    # No complete header: name what the closest candidate lacks rather than "header not found".
    if best is not None and best[0] >= len(COLUMNS) // 2:
        _, index, fields = best
        missing = [name for name in COLUMNS if name not in fields]
        raise CatalogError(f"catalogue {url}: header row (line {index + 1}) lacks column(s) {', '.join(missing)}")
    raise CatalogError(f"catalogue {url}: no header row naming the columns {', '.join(COLUMNS)}")


def _convert_column(name: str, values: list[str], row_lines: list[int], url: str) -> np.ndarray:
    try:
        return np.array(values, dtype=np.int64) if name in INT_COLUMNS else np.array(values, dtype=np.float64)
    except ValueError:
        pass
    # Slow path: find the first offending value to name its line (and accept "12.0" for integers).
    out = np.empty(len(values), dtype=np.int64 if name in INT_COLUMNS else np.float64)
    for k, text in enumerate(values):
        try:
            number = float(text)
        except ValueError:
            raise CatalogError(
                f"catalogue {url}, line {row_lines[k]}, column {name}: {text!r} is not a number"
            ) from None
        if name in INT_COLUMNS:
            if not np.isfinite(number) or number != int(number):
                raise CatalogError(f"catalogue {url}, line {row_lines[k]}, column {name}: {text!r} is not an integer")
            number = int(number)
        out[k] = number
    return out


def parse_catalog(text: str, url: str = "<text>") -> Catalog:
    """Parse challenge catalogue text (``url`` only names the source in errors and logs)."""
    return _drop_duplicates(_parse_challenge(text.splitlines(), url))


def _parse_challenge(lines: list[str], url: str) -> Catalog:
    """The challenge catalogue's rows, typed, duplicates not yet dropped."""
    header_index, header = _find_header(lines, url)
    n_fields = len(header)
    # The unnamed leading row index is not data; any other named column is kept as text.
    named = [(k, name) for k, name in enumerate(header) if name]
    dupes = {name for _, name in named if sum(n == name for _, n in named) > 1}
    if dupes:
        raise CatalogError(f"catalogue {url}: header row (line {header_index + 1}) repeats column(s) {sorted(dupes)}")

    columns: dict[str, list[str]] = {name: [] for _, name in named}
    row_lines: list[int] = []
    for offset, fields in enumerate(csv.reader(lines[header_index + 1 :])):
        line_no = header_index + 2 + offset
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line (e.g. the trailing newline)
        if len(fields) != n_fields:
            raise CatalogError(
                f"catalogue {url}, line {line_no}: {len(fields)} fields, the header (line {header_index + 1}) has {n_fields}"
            )
        for k, name in named:
            columns[name].append(fields[k].strip())
        row_lines.append(line_no)

    table = pd.DataFrame(
        {
            name: _convert_column(name, values, row_lines, url) if name in COLUMNS else pd.array(values, dtype=object)
            for name, values in columns.items()
        }
    )
    table = table[[*COLUMNS, *(name for name in columns if name not in COLUMNS)]]
    return Catalog(url=url, table=table, lines=np.asarray(row_lines, dtype=np.int64), duplicates=())


def _drop_duplicates(catalog: Catalog) -> Catalog:
    ids = catalog.ids
    repeated = pd.Series(ids).duplicated(keep="first").to_numpy()
    if not repeated.any():
        return catalog
    first_line: dict[int, int] = {}
    for object_id, line in zip(ids[~repeated], catalog.lines[~repeated], strict=False):
        first_line[int(object_id)] = int(line)
    dropped = tuple(
        DroppedDuplicate(int(object_id), int(line), first_line[int(object_id)])
        for object_id, line in zip(ids[repeated], catalog.lines[repeated], strict=False)
    )
    distinct = sorted({d.object_id for d in dropped})
    word = catalog.row_word
    shown = ", ".join(f"{d.object_id} ({word} {d.line}, kept {word} {d.kept_line})" for d in dropped[:10])
    log.warning(
        "catalogue %s: %d duplicate row(s) of %d ID(s) dropped, first occurrence kept: %s%s",
        catalog.url,
        len(dropped),
        len(distinct),
        shown,
        " ..." if len(dropped) > 10 else "",
    )
    return replace(
        catalog,
        table=catalog.table[~repeated].reset_index(drop=True),
        lines=catalog.lines[~repeated],
        duplicates=dropped,
    )


def _utf8(raw: bytes, url: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CatalogError(f"catalogue {url}, line {line}: not UTF-8 text ({exc.reason})") from None


def read_catalog(url: str) -> Catalog:
    """Read the challenge catalogue from a local path or ``s3://`` URL."""
    return parse_catalog(_utf8(storage.read_bytes(url), url), url)


def apply_label_rule(catalog: Catalog, rule: LabelRule) -> LabelledIDs:
    """Labels under a named rule (README "Data contracts"); IDs the rule cannot label are excluded, with why.

    paper:     lens iff n_sources > 0.
    official:  lens iff mag_eff > 2; non-lens iff n_sources == 0 or mag_eff < 1.2; others excluded
               (also rows meeting both conditions, which the rule cannot decide).
    challenge: lens iff n_source_im > 0 and mag_eff > 1.6 and n_pix_source > 20, else non-lens.
    """
    table = catalog.table
    ids = catalog.ids
    mag_eff = table["mag_eff"].to_numpy(dtype=np.float64)
    n_sources = table["n_sources"].to_numpy(dtype=np.int64)
    reasons = np.full(len(ids), "", dtype=object)
    if rule == "paper":
        lens = n_sources > 0
        keep = np.ones(len(ids), dtype=bool)
    elif rule == "official":
        lens_cond = mag_eff > 2
        non_lens_cond = (n_sources == 0) | (mag_eff < 1.2)
        keep = lens_cond ^ non_lens_cond
        lens = lens_cond & keep
        reasons[lens_cond & non_lens_cond] = "official: mag_eff > 2 but n_sources == 0 (contradictory)"
        undecided = ~lens_cond & ~non_lens_cond
        reasons[undecided & np.isnan(mag_eff)] = "official: n_sources > 0 and mag_eff is NaN"
        reasons[undecided & ~np.isnan(mag_eff)] = "official: n_sources > 0 and 1.2 <= mag_eff <= 2"
    elif rule == "challenge":
        lens = (table["n_source_im"].to_numpy() > 0) & (mag_eff > 1.6) & (table["n_pix_source"].to_numpy() > 20)
        keep = np.ones(len(ids), dtype=bool)
    else:
        raise ValueError(f"unknown label rule {rule!r}; choose one of {', '.join(LABEL_RULES)}")

    order = np.argsort(ids[keep], kind="stable")
    excluded = tuple(
        Exclusion(int(object_id), str(reason)) for object_id, reason in zip(ids[~keep], reasons[~keep], strict=False)
    )
    return LabelledIDs(
        rule=rule,
        ids=ids[keep][order],
        labels=lens[keep][order].astype(np.int8),
        excluded=tuple(sorted(excluded)),
    )


def label_counts(labelled: LabelledIDs) -> dict[str, int]:
    """``{"lens": .., "non_lens": .., "excluded": ..}`` for one rule's labelling (and ``"unlabelled"`` when
    there are unlabelled IDs)."""
    labels = labelled.labels
    counts = {
        "lens": int((labels == 1).sum()),
        "non_lens": int((labels == 0).sum()),
        "excluded": len(labelled.excluded),
    }
    if (labels == -1).any():
        counts["unlabelled"] = int((labels == -1).sum())
    return counts


# --- any catalogue: CSV, FITS, ECSV, Parquet through astropy.table ------------------------------------

# File extensions (after a trailing .gz) -> format; anything else is read as CSV, as the challenge file is.
EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".ecsv": "ecsv",
    ".parquet": "parquet",
    ".parq": "parquet",
    ".pq": "parquet",
}
_ASTROPY_FORMATS = {"csv": "ascii.csv", "fits": "fits", "ecsv": "ascii.ecsv", "parquet": "parquet"}
# The challenge header is looked for this far into a CSV: its comment block is a few dozen lines.
_CHALLENGE_HEADER_WITHIN = 1000


def catalog_format(url: str, requested: str = "auto") -> str:
    """``csv`` | ``fits`` | ``ecsv`` | ``parquet``: ``requested``, or from the file name when it is ``auto``."""
    if requested != "auto":
        return requested
    name = posixpath.basename(url.split("?", 1)[0]).lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    return EXTENSIONS.get(posixpath.splitext(name)[1], "csv")


def load_catalog(url: str, data: DataConfig) -> Catalog:
    """Any catalogue, with ``data``'s ID, label, coordinate and kept columns checked and typed; duplicate
    IDs reported and the first row kept. A CSV with the challenge header is read as the challenge file."""
    fmt = catalog_format(url, data.catalog_format)
    source: bytes | str = storage.read_bytes(url)
    if fmt == "csv":
        source = _utf8(source, url)
        lines = source.splitlines()
        best = _closest_header(lines[:_CHALLENGE_HEADER_WITHIN])
        if best is not None and best[0] >= len(COLUMNS) // 2:  # the challenge file (or a broken one: say so)
            return _select(_parse_challenge(lines, url), data)
    table = _astropy_table(source, url, fmt)
    if fmt == "csv" and data.id_column not in table.colnames:  # meant as either: say what each lacks
        raise CatalogError(
            f"catalogue {url}: no header row naming the challenge columns ({', '.join(COLUMNS[:3])}, ...), "
            f"and no ID column {data.id_column!r} (columns: {', '.join(table.colnames[:20])})"
        )
    names = _wanted_columns(data)
    _check_present(url, table.colnames, data)
    frame = pd.DataFrame({name: _column_values(table, name, url, data) for name in names})
    rows = np.arange(1, len(frame) + 1, dtype=np.int64)
    catalog = Catalog(url=url, table=frame, lines=rows, duplicates=(), challenge=False, row_word="data row")
    return _select(catalog, data)


def _astropy_table(source: bytes | str, url: str, fmt: str) -> Any:
    """The file's table as ``astropy.table.Table``; one CatalogError naming the file when it is unreadable."""
    import warnings

    from astropy.table import Table

    if isinstance(source, bytes):  # astropy reads text formats from a str, binary ones from a file object
        source = _utf8(source, url) if fmt == "ecsv" else io.BytesIO(source)
    options = {"comment": "#"} if fmt == "csv" else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's "more than one table HDU" and unit chatter
            table = Table.read(source, format=_ASTROPY_FORMATS[fmt], **options)
    except Exception as exc:  # astropy's readers raise many kinds; each means the same here
        raise CatalogError(f"catalogue {url}: not a readable {fmt} table ({type(exc).__name__}: {exc})") from None
    table.convert_bytestring_to_unicode()  # FITS text columns arrive as bytes
    return table


def _wanted_columns(data: DataConfig) -> list[str]:
    names = [data.id_column, data.label_column, *(data.coord_columns or ()), *data.keep_columns]
    return list(dict.fromkeys(name for name in names if name is not None))


def _check_present(url: str, columns: list[str], data: DataConfig) -> None:
    roles = [("ID column", data.id_column), ("label column", data.label_column)]
    roles += [(f"{axis} column", name) for axis, name in zip(("RA", "Dec"), data.coord_columns or (), strict=False)]
    roles += [("kept column", name) for name in data.keep_columns]
    for role, name in roles:
        if name is not None and name not in columns:
            shown = ", ".join(columns[:20]) + (" ..." if len(columns) > 20 else "")
            raise CatalogError(f"catalogue {url}: no {role} {name!r} (columns: {shown})")


def _column_values(table: Any, name: str, url: str, data: DataConfig) -> Any:
    """One 1-D column as numpy/pandas values; coordinates with an angle unit in degrees; masked -> NA."""
    import astropy.units as u

    column = table[name]
    if column.ndim != 1:
        raise CatalogError(f"catalogue {url}, column {name}: {column.ndim}-D values (shape {column.shape}); 1-D needed")
    mask = np.ma.getmaskarray(column)
    values = np.ma.getdata(column)
    if data.coord_columns is not None and name in data.coord_columns and column.unit is not None:
        try:
            values = (np.asarray(values, dtype=np.float64) * column.unit).to_value(u.deg)
        except (u.UnitConversionError, TypeError, ValueError):
            raise CatalogError(f"catalogue {url}, column {name}: unit {column.unit} is not an angle") from None
    values = np.asarray(values)
    values = values.astype(values.dtype.newbyteorder("="), copy=False)  # FITS is big-endian; pandas needs native
    if not mask.any():
        return values
    if values.dtype.kind == "f":
        return np.where(mask, np.nan, values)
    if values.dtype.kind in "iu":
        return pd.arrays.IntegerArray(values.astype(np.int64), mask)  # nullable: integers stay integers
    return pd.Series(values).astype(object).where(~mask, None)


def _select(catalog: Catalog, data: DataConfig) -> Catalog:
    """``catalog`` with typed IDs (duplicates dropped), labels, coordinates; its kept columns checked."""
    url, word = catalog.url, catalog.row_word
    _check_present(url, list(catalog.table.columns), data)
    table = catalog.table.copy()
    table[data.id_column] = _integer_ids(table[data.id_column], catalog.lines, url, data.id_column, word)
    catalog = _drop_duplicates(replace(catalog, table=table, id_column=data.id_column))
    table, ids = catalog.table.copy(), catalog.ids
    if data.label_column is not None:
        table[data.label_column] = _labels(table[data.label_column], ids, catalog, data.label_column)
    for axis, name in zip(("RA", "Dec"), data.coord_columns or (), strict=False):
        table[name] = _coordinates(table[name], ids, catalog, name, axis)
    return replace(
        catalog,
        table=table,
        label_column=data.label_column,
        coord_columns=data.coord_columns,
        keep_columns=data.keep_columns,
    )


def _integer_ids(values: pd.Series, lines: np.ndarray, url: str, column: str, word: str) -> np.ndarray:
    """int64 IDs; integer-valued floats and numeric text accepted; anything else names its row."""
    missing = isinstance(values.dtype, pd.api.extensions.ExtensionDtype) and values.isna().any()
    array = values.to_numpy(dtype=object) if missing else values.to_numpy()
    if array.dtype.kind == "i":
        return array.astype(np.int64)
    if array.dtype.kind == "u":
        if array.size and array.max() > np.iinfo(np.int64).max:
            k = int(np.argmax(array > np.iinfo(np.int64).max))
            raise CatalogError(f"catalogue {url}, column {column}: {word} {lines[k]} is {array[k]}, beyond int64")
        return array.astype(np.int64)
    out = np.empty(len(array), dtype=np.int64)
    for k, value in enumerate(array):
        number = _as_integer(value)
        if number is None:
            raise CatalogError(
                f"catalogue {url}, column {column}: {word} {lines[k]} is {_shown(value)}, not an integer"
            )
        out[k] = number
    return out


def _shown(value: Any) -> str:
    """A cell for an error message: ``'abc'``, ``0.5``, ``empty``."""
    if value is None or value is pd.NA:
        return "empty"
    return repr(value.item() if isinstance(value, np.generic) else value)


def _as_integer(value: Any) -> int | None:
    """``value`` as an int (exact for integer text of any size), or None when it is not a whole number."""
    if value is None or value is pd.NA or isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if np.isfinite(number) and number == int(number) else None


_TRUE, _FALSE = frozenset({"1", "true", "1.0"}), frozenset({"0", "false", "0.0"})


def _labels(values: pd.Series, ids: np.ndarray, catalog: Catalog, column: str) -> np.ndarray:
    """int8 1/0 from 1/0 or true/false (any case); any other value is an error naming its ID and row."""
    array = values.to_numpy()
    if array.dtype.kind == "b" or (array.dtype.kind in "iuf" and np.isin(array, (0, 1)).all()):
        return array.astype(np.int8)  # the usual case, without a Python loop
    out = np.empty(len(values), dtype=np.int8)
    for k, value in enumerate(array):
        text = str(value).strip().lower() if value is not None else ""
        if isinstance(value, (bool, np.bool_)):
            out[k] = int(value)
        elif text in _TRUE or text in _FALSE:
            out[k] = 1 if text in _TRUE else 0
        else:
            raise CatalogError(
                f"catalogue {catalog.url}, column {column}: ID {ids[k]} ({catalog.where(k)}) has label {_shown(value)}; "
                "labels must be 1/0 or true/false"
            )
    return out


def _coordinates(values: pd.Series, ids: np.ndarray, catalog: Catalog, column: str, axis: str) -> np.ndarray:
    """float64 degrees; a missing or non-numeric value, or one outside RA [0, 360] / Dec [-90, 90], is an error."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    low, high = (0.0, 360.0) if axis == "RA" else (-90.0, 90.0)
    bad = np.flatnonzero(~((numbers >= low) & (numbers <= high)))
    if bad.size:
        k = int(bad[0])
        raise CatalogError(
            f"catalogue {catalog.url}, column {column}: ID {ids[k]} ({catalog.where(k)}) has {axis} "
            f"{_shown(values.iloc[k])}; degrees in [{low:g}, {high:g}] expected"
        )
    return numbers


def label_ids(catalog: Catalog, data: DataConfig) -> LabelledIDs:
    """The catalogue's labels: from ``data.label_column``; else, for the challenge catalogue, under the rule
    ``data.labels``; else every ID unlabelled (-1: the catalogue can be ingested and scored, not trained on)."""
    if catalog.label_column is not None:
        order = np.argsort(catalog.ids, kind="stable")
        labels = catalog.table[catalog.label_column].to_numpy(dtype=np.int8)
        return LabelledIDs(f"column:{catalog.label_column}", catalog.ids[order], labels[order], ())
    if catalog.challenge:
        return apply_label_rule(catalog, data.labels)
    ids = np.sort(catalog.ids)
    return LabelledIDs("unlabelled", ids, np.full(len(ids), -1, dtype=np.int8), ())
