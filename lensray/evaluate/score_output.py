"""A scoring job's result (``ScoreResult``: ranked candidates, rejects, the gallery's images, timings) and its
files: ``write_scores`` writes the candidates (Parquet), ``<stem>_rejects.csv``, ``<stem>_summary.json`` and
``<stem>_gallery.html`` and returns a ``ScoreSummary`` (what the CLI prints). No Ray here.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lensray import storage
from lensray.evaluate.parts import PartPlan
from lensray.evaluate.score_inputs import ScoreInputs, profile_entry


@dataclass(frozen=True, eq=False)
class ScoreResult:
    """Ranked candidates, rejects and the top candidates' images: everything the output files hold."""

    inputs: ScoreInputs
    tta: str | None
    candidates: pd.DataFrame  # rank, id, score (score_d4_0..7 with tta; ra, dec, kept columns), best first
    rejects: pd.DataFrame  # id, reason, message, by id
    top: pd.DataFrame  # the gallery's candidates (the first rows of ``candidates``)
    gallery_images: np.ndarray | None  # ``top`` as the network saw them; None without a gallery
    device: str
    actors: int
    score_s: float  # reading, preprocessing and predicting every cutout
    parts: PartPlan | None = None  # where the per-part results stream to; ``parts.done``: resumed parts


@dataclass(frozen=True)
class ScoreSummary:
    candidates_url: str
    rejects_url: str
    gallery_path: str | None
    summary_url: str
    n_ids: int
    n_scored: int
    rejects: pd.DataFrame
    top: pd.DataFrame
    repeated_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    actors: int = 1
    wall_s: float = 0.0
    result: ScoreResult | None = None
    parts: PartPlan | None = None

    def __str__(self) -> str:
        lines = [
            f"scored {self.n_scored} of {self.n_ids} IDs in {self.wall_s:.1f} s "
            f"({self.n_scored / max(self.wall_s, 1e-9):.1f} IDs/s, {self.actors} {self.device} actor(s))",
            f"  candidates (ranked): {self.candidates_url}",
            f"  rejects ({len(self.rejects)}): {self.rejects_url}",
        ]
        if self.parts is not None:
            resumed = f"; {len(self.parts.done)} resumed from an earlier run" if self.parts.done else ""
            lines.append(f"  parts ({self.parts.n_parts} x {self.parts.part_size} IDs{resumed}): {self.parts.url}")
        if self.gallery_path:
            lines.append(f"  gallery of the top {len(self.top)}: {self.gallery_path}")
        for row in self.top.head(5).itertuples():
            where = f"  RA {row.ra:.5f} Dec {row.dec:+.5f}" if hasattr(row, "ra") else ""
            spread = f" +- {row.score_std:.4f}" if hasattr(row, "score_std") else ""
            lines.append(f"    #{row.rank:<4d} ID {row.id}  score {row.score:.4f}{spread}{where}")
        for row in self.rejects.head(5).itertuples():
            lines.append(f"    rejected {row.id}: {row.message}")
        if self.repeated_ids:
            lines.append(f"  {len(self.repeated_ids)} repeated catalogue ID(s) scored once: {self.repeated_ids[:10]}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def sibling_url(out_url: str, suffix: str) -> str:
    """``out_url`` with ``suffix`` in place of its ``.parquet`` (or after it, without one)."""
    stem = out_url[: -len(".parquet")] if out_url.endswith(".parquet") else out_url
    return f"{stem}{suffix}"


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    return sink.getvalue().to_pybytes()


def write_scores(result: ScoreResult, out_url: str) -> ScoreSummary:
    """Write ``<stem>_rejects.csv``, ``<stem>_gallery.html`` (when there are gallery images),
    ``<stem>_summary.json`` and, last, the candidates (Parquet): a candidates file that exists belongs to a
    finished scoring, even when the storage went away half-way through these writes."""
    rejects_url = sibling_url(out_url, "_rejects.csv")
    storage.write_bytes(rejects_url, result.rejects.to_csv(index=False).encode())
    gallery_url = None
    if result.gallery_images is not None:
        gallery_url = sibling_url(out_url, "_gallery.html")
        storage.write_bytes(gallery_url, candidate_gallery_html(result).encode())
    summary = ScoreSummary(
        candidates_url=out_url,
        rejects_url=rejects_url,
        gallery_path=gallery_url,
        summary_url=sibling_url(out_url, "_summary.json"),
        n_ids=len(result.inputs.ids),
        n_scored=len(result.candidates),
        rejects=result.rejects,
        top=result.top,
        repeated_ids=list(result.inputs.repeated),
        notes=[*result.inputs.prepared.notes, *_parts_notes(result.parts)],
        device=result.device,
        actors=result.actors,
        wall_s=time.perf_counter() - result.inputs.started,
        result=result,
        parts=result.parts,
    )
    storage.write_bytes(summary.summary_url, json.dumps(summary_json(result, summary.wall_s), indent=1).encode())
    storage.write_bytes(out_url, _parquet_bytes(result.candidates))
    return summary


def summary_json(result: ScoreResult, wall_s: float) -> dict[str, Any]:
    """``<stem>_summary.json``: the job's inputs, the counts, every reject and the top candidates."""
    inputs = result.inputs
    return {
        "checkpoint": inputs.checkpoint_url,
        "members": None
        if inputs.ensemble is None
        else [{"name": m.name, "checkpoint": m.checkpoint} for m in inputs.ensemble.members],
        "ensemble_source": None if inputs.ensemble is None else inputs.ensemble.source,
        "images": inputs.images_url,
        "catalog": inputs.catalog_url,
        "tta": result.tta,
        "bands": list(inputs.prepared.bands),
        "transform": inputs.prepared.preprocess.model_dump(mode="json", exclude={"out"}),
        **profile_entry(inputs),
        "nan_policy": inputs.nan_policy,
        "n_ids": len(inputs.ids),
        "n_scored": len(result.candidates),
        "n_rejected": len(result.rejects),
        "rejects": result.rejects.to_dict(orient="records"),
        "repeated_ids": list(inputs.repeated),
        "notes": list(inputs.prepared.notes),
        "device": result.device,
        "actors": result.actors,
        "wall_s": round(wall_s, 3),
        "catalog_columns": [] if inputs.columns is None else list(inputs.columns.columns[1:]),
        "top": result.top[_shown_columns(result.top)].to_dict(orient="records"),
        "parts": None if result.parts is None else _parts_json(result.parts),
    }


def _parts_notes(parts: PartPlan | None) -> list[str]:
    if parts is None or not parts.discarded:
        return []
    return [f"--fresh: discarded {parts.discarded} finished part(s) of an earlier job under {parts.url}"]


def _parts_json(parts: PartPlan) -> dict[str, Any]:
    return {
        "url": parts.url,
        "part_size": parts.part_size,
        "n_parts": parts.n_parts,
        "resumed": len(parts.done),
        "discarded": parts.discarded,
    }


def _shown_columns(top: pd.DataFrame) -> list[str]:
    """The candidate columns a summary shows: rank, id, score and, when the catalogue gave them, ra and dec."""
    return [name for name in ("rank", "id", "score", "score_std", "ra", "dec") if name in top.columns]


def candidate_gallery_html(result: ScoreResult) -> str:
    """A self-contained page: the top candidates as the network saw them, and the rejects."""
    from lensray.evaluate.report import gallery_png, html_page, html_table

    inputs, top, rejects = result.inputs, result.top, result.rejects
    prepared, esc = inputs.prepared, html.escape
    spread = ["" if getattr(r, "score_std", None) is None else f" +- {r.score_std:.4f}" for r in top.itertuples()]
    captions = [f"#{r.rank} ID {r.id}\nscore {r.score:.4f}{s}" for r, s in zip(top.itertuples(), spread, strict=True)]
    picture = gallery_png(result.gallery_images, captions, prepared.bands, per_row=max(1, 12 // len(prepared.bands)))
    blocks = [
        f"<p>Checkpoint <code>{esc(inputs.checkpoint_url)}</code>; catalogue <code>{esc(inputs.catalog_url)}</code>; "
        f"images <code>{esc(inputs.images_url)}</code>; test-time averaging: {result.tta or 'none'}. Bands "
        f"{', '.join(prepared.bands)} as the network sees them ({prepared.preprocess.mode} mode), one fixed "
        "display range per band.</p>",
        ("Top candidates", picture),
        html_table(top[_shown_columns(top)].to_dict(orient="records"), _shown_columns(top)),
        f"<h2>Rejected cutouts ({len(rejects)})</h2>",
        html_table(rejects.to_dict(orient="records"), ["id", "reason", "message"]) if len(rejects) else "<p>none</p>",
    ]
    return html_page(f"lensray candidates: top {len(top)}", blocks)
