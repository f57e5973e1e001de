"""Pictures people look at: preview grids of cutouts (and, later, ROC/PR plots, galleries, HTML)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the demo and cluster jobs have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.visualization import ImageNormalize, ZScaleInterval  # noqa: E402


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
