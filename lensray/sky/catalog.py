"""The challenge catalogue: reading it, label rules (paper, official, challenge), duplicate IDs.

The file is comma-separated: a comment block describing the fields, a header row of 27 columns (the
first an unnamed row index) and the rows. The header is found by its content, never by a fixed skip
count, because the comment block's length differs between releases. Every problem is an error naming
the URL, the line in the file and the column; duplicate IDs are reported and the first row kept.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from typing import NamedTuple, get_args

import numpy as np
import pandas as pd

from lensray import storage
from lensray.config import LabelRule
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
    table: pd.DataFrame  # columns COLUMNS (+ any extra named ones), RangeIndex
    lines: np.ndarray  # int64: the file line (1-based) of each row of ``table``
    duplicates: tuple[DroppedDuplicate, ...]  # one entry per dropped row

    @property
    def ids(self) -> np.ndarray:
        return self.table["ID"].to_numpy(dtype=np.int64)

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
    """IDs with a 0/1 label under one rule (sorted by ID), and the IDs the rule leaves out, with why."""

    rule: str
    ids: np.ndarray  # int64, sorted
    labels: np.ndarray  # int8, 1 = lens
    excluded: tuple[Exclusion, ...]

    def __len__(self) -> int:
        return len(self.ids)


def _find_header(lines: list[str], url: str) -> tuple[int, list[str]]:
    """Index and fields of the first line whose fields include every name in COLUMNS."""
    best: tuple[int, int, list[str]] | None = None  # (matches, index, fields) of the closest line
    for index, line in enumerate(lines):
        fields = [f.strip() for f in next(csv.reader([line]), [])]
        present = set(fields)
        matches = sum(name in present for name in COLUMNS)
        if matches == len(COLUMNS):
            return index, fields
        if matches and (best is None or matches > best[0]):
            best = (matches, index, fields)
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
    """Parse catalogue text (``url`` only names the source in errors and logs)."""
    lines = text.splitlines()
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
    lines_arr = np.asarray(row_lines, dtype=np.int64)
    return _drop_duplicates(Catalog(url=url, table=table, lines=lines_arr, duplicates=()))


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
    shown = ", ".join(f"{d.object_id} (line {d.line}, kept line {d.kept_line})" for d in dropped[:10])
    log.warning(
        "catalogue %s: %d duplicate row(s) of %d ID(s) dropped, first occurrence kept: %s%s",
        catalog.url,
        len(dropped),
        len(distinct),
        shown,
        " ..." if len(dropped) > 10 else "",
    )
    return Catalog(
        url=catalog.url,
        table=catalog.table[~repeated].reset_index(drop=True),
        lines=catalog.lines[~repeated],
        duplicates=dropped,
    )


def read_catalog(url: str) -> Catalog:
    """Read the challenge catalogue from a local path or ``s3://`` URL."""
    raw = storage.read_bytes(url)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CatalogError(f"catalogue {url}, line {line}: not UTF-8 text ({exc.reason})") from None
    return parse_catalog(text, url)


def apply_label_rule(catalog: Catalog, rule: LabelRule) -> LabelledIDs:
    """Labels under a named rule (README "Data contracts"); IDs the rule cannot label are excluded, with why.

    paper:     lens iff n_sources > 0.
    official:  lens iff mag_eff > 2; non-lens iff n_sources == 0 or mag_eff < 1.2; others excluded
               (also rows meeting both conditions, which the rule cannot decide).
    challenge: lens iff n_source_im > 0 and mag_eff > 1.6 and n_pix_source > 20, else non-lens.
    """
    table = catalog.table
    ids = table["ID"].to_numpy(dtype=np.int64)
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
    """``{"lens": .., "non_lens": .., "excluded": ..}`` for one rule's labelling."""
    n_lens = int(labelled.labels.sum())
    return {"lens": n_lens, "non_lens": len(labelled.labels) - n_lens, "excluded": len(labelled.excluded)}
