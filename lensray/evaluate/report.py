"""Pictures people look at: preview grids, ROC / precision-recall / reliability plots, galleries of
cutouts, and self-contained HTML pages (every image embedded as a base64 PNG, so a report is one file
that can be mailed or opened from object storage).

Numbers are computed elsewhere (``metrics``, ``evaluate``); this module only draws and lays out.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # headless: the demo and cluster jobs have no display

import matplotlib.pyplot as plt
import numpy as np
from astropy.visualization import ImageNormalize, ZScaleInterval


def preview_grid(
    rows: Sequence[tuple[str, Mapping[str, np.ndarray]]],
    bands: Sequence[str],
    out_path: str | Path,
    title: str = "",
) -> Path:
    """Save a grid: one row per object, one column per (band, view).

    ``rows`` holds (row label, {view name: array}); a view is either a native 2-D raw stamp per band
    (key ``"raw:<band>"``) or a preprocessed (C, H, W) stack (key = mode name). Raw stamps are shown
    with a z-scale interval (what astronomers use for raw frames), preprocessed ones as they are.
    """
    views = [v for v in rows[0][1] if not v.startswith("raw:")]
    columns = [(band, "raw") for band in bands] + [(band, view) for view in views for band in bands]
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(1.25 * len(columns), 1.35 * len(rows) + 0.6), squeeze=False
    )
    for r, (label, content) in enumerate(rows):
        for c, (band, view) in enumerate(columns):
            ax = axes[r][c]
            if view == "raw":
                image = content[f"raw:{band}"]
                norm = ImageNormalize(image, interval=ZScaleInterval())
                ax.imshow(image, origin="lower", cmap="gray", norm=norm, interpolation="nearest")
            else:
                image = np.asarray(content[view][list(bands).index(band)], dtype=np.float32)
                ax.imshow(image, origin="lower", cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{band} {view}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


# --- plots as PNG bytes ---------------------------------------------------------------------------


class Curve(NamedTuple):
    """One labelled line of a plot: ``y`` against ``x``."""

    label: str
    x: np.ndarray
    y: np.ndarray


def _png(fig: plt.Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")  # keeps legends placed outside the axes
    plt.close(fig)
    return buffer.getvalue()


def roc_png(curves: Sequence[Curve], title: str = "ROC", min_fpr: float | None = None) -> bytes:
    """ROC curves (x = false-positive rate, y = true-positive rate), linear and with a log FPR axis.

    The log panel shows the low-FPR end where TPR0 / TPR10 live; ``min_fpr`` (e.g. 1 / n_neg) sets
    its left edge, since an FPR of 0 has no place on a log axis.
    """
    fig, (linear, logx) = plt.subplots(1, 2, figsize=(9.0, 4.0))
    for k, curve in enumerate(curves):
        style = {"label": curve.label, "lw": 1.4, "drawstyle": "steps-post", "ls": ("-", "--", ":")[k // 10 % 3]}
        linear.plot(curve.x, curve.y, **style)
        logx.plot(curve.x, curve.y, **style)
    linear.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="random")
    logx.set_xscale("log")
    positive = [c.x[c.x > 0].min() for c in curves if np.any(c.x > 0)]
    left = min_fpr or (min(positive) if positive else 1e-3)
    logx.set_xlim(left * 0.8, 1.0)
    for ax, name in ((linear, "false-positive rate"), (logx, "false-positive rate (log)")):
        ax.set_xlabel(name)
        ax.set_ylabel("true-positive rate")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    linear.set_xlim(0, 1)
    if len(curves) <= 3:
        linear.legend(fontsize=7, loc="lower right")
    else:  # many runs: beside the plots, not over the curves
        logx.legend(*linear.get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def pr_png(curves: Sequence[Curve], prevalence: float | None = None, title: str = "Precision-recall") -> bytes:
    """Precision (y) against recall (x); ``prevalence`` draws the precision of random guessing."""
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    for curve in curves:
        ax.plot(curve.x, curve.y, label=curve.label, lw=1.4, drawstyle="steps-post")
    if prevalence is not None:
        ax.axhline(prevalence, color="0.6", lw=0.8, ls="--", label=f"random ({prevalence:.2f})")
    ax.set_xlabel("recall (true-positive rate)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def calibration_png(
    mean_predicted: np.ndarray,
    fraction_positive: np.ndarray,
    counts: np.ndarray,
    edges: np.ndarray,
    title: str = "Reliability",
) -> bytes:
    """Reliability diagram: the fraction of lenses per score bin against the bin's mean score, and
    below it how many objects fall in each bin (empty bins have no point)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.8, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="perfectly calibrated")
    filled = counts > 0
    top.plot(mean_predicted[filled], fraction_positive[filled], "o-", lw=1.4, label="model")
    top.set_ylabel("fraction of lenses")
    top.set_ylim(0, 1.01)
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper left")
    top.set_title(title, fontsize=10)
    bottom.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="0.5")
    bottom.set_xlabel("predicted lens probability")
    bottom.set_ylabel("objects")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    return _png(fig)


def display_limits(images: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """(C, 2) fixed linear display range per band over a whole gallery: the network's input values,
    no per-image rescaling, so brightness compares across objects as the network sees it."""
    images = np.asarray(images, dtype=np.float32)
    flat = np.moveaxis(images, 1, 0).reshape(images.shape[1], -1)
    limits = np.percentile(flat, percentiles, axis=1).T
    same = limits[:, 1] <= limits[:, 0]
    limits[same, 1] = limits[same, 0] + 1.0  # a constant band: any non-empty range
    return limits


def gallery_png(
    images: np.ndarray,
    captions: Sequence[str],
    bands: Sequence[str],
    *,
    per_row: int = 4,
    limits: np.ndarray | None = None,
    title: str = "",
) -> bytes:
    """Cutouts (N, C, H, W) side by side, every band of an object in a row, its caption under it."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != len(bands):
        raise ValueError(f"gallery needs (N, {len(bands)}, H, W) images for bands {list(bands)}, got {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    if len(images) == 0:
        raise ValueError("an empty gallery has nothing to draw")
    limits = display_limits(images) if limits is None else np.asarray(limits)
    n, channels = len(images), images.shape[1]
    per_row = max(1, min(per_row, n))
    rows = math.ceil(n / per_row)
    stride = channels + 1  # a narrow blank column between objects
    ratios = ([1.0] * channels + [0.15]) * per_row
    fig, axes = plt.subplots(
        rows,
        stride * per_row - 1,
        squeeze=False,
        gridspec_kw={"width_ratios": ratios[:-1]},
        figsize=(sum(ratios) + 0.2, 1.45 * rows + (0.35 if title else 0.1)),
    )
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(n):
        r, c0 = divmod(k, per_row)
        for c in range(channels):
            ax = axes[r][c0 * stride + c]
            ax.axis("on")
            ax.imshow(
                images[k, c], origin="lower", cmap="gray", vmin=limits[c, 0], vmax=limits[c, 1], interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(bands[c], fontsize=6, pad=2)
        axes[r][c0 * stride].set_xlabel(captions[k], fontsize=7, loc="left", labelpad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, w_pad=0.1, h_pad=0.4)
    return _png(fig)


# --- self-contained HTML ---------------------------------------------------------------------------

# After the load event the page counts the images that decoded (naturalWidth > 0) and writes the count
# to <body data-images-loaded="k/n"> and the title, so a headless browser (or a person) can check it.
_LOAD_CHECK = """<script>
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) { loaded++; } }
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
  document.title = document.title + " [" + loaded + "/" + images.length + " images loaded]";
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.55em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
figure { margin: 0.6em 0 1.4em; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; } code { font-size: 0.9em; }
</style>"""


def img_tag(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A plain table; numbers right-aligned and shortened, text left-aligned, everything escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in (headers or columns))
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            kind = "" if isinstance(value, (int, float, np.integer, np.floating)) else ' class="text"'
            cells.append(f"<td{kind}>{html.escape(format_cell(value))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def html_page(title: str, blocks: Sequence[str | tuple[str, bytes]]) -> str:
    """One HTML document: each block is raw HTML, or ``(caption, png bytes)`` for an embedded figure."""
    parts = []
    for block in blocks:
        if isinstance(block, tuple):
            caption, png = block
            parts.append(f"<figure>{img_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
        else:
            parts.append(block)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"{_STYLE}</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts)
        + f"\n{_LOAD_CHECK}\n</body></html>\n"
    )
