"""The catalogue quantities of one object, measured on its noiseless VIS maps and its mass model:
critical curves, detected pixels and fluxes, visible images, and what the scene drew."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver
from scipy import ndimage

from lensray.simulate.instrument import CANVAS_PIXEL, CANVAS_X, CANVAS_Y, VIS_MARGIN, band_observation, window
from lensray.simulate.render import RenderedScene
from lensray.simulate.scene import Scene, lens_model
from lensray.sky.bands import BANDS

FIELD_DESCRIPTIONS: dict[str, str] = {
    "ID": "object identifier; images EUC_<band>/imageEUC_<band>-<ID>.fits",
    "x_crit": "x of the tangential critical curve's centroid (VIS pixels, 0-based; the lens centre if none)",
    "y_crit": "y of the tangential critical curve's centroid (VIS pixels, 0-based; the lens centre if none)",
    "source_ID": "identifier of the lensed source (0: no source)",
    "z_source": "source redshift (0: no source)",
    "z_lens": "lens galaxy redshift",
    "mag_source": "unlensed VIS AB magnitude of the source (0: no source)",
    "ein_area": "area inside the Einstein radius, pi*theta_E^2 (arcsec^2)",
    "n_crit": "number of critical curves (connected regions of negative magnification) in the VIS stamp",
    "r_source": "source effective (Sersic) radius (arcsec; 0: no source)",
    "crit_area": "area inside the critical curves (arcsec^2)",
    "n_pix_source": "VIS pixels where the noiseless lensed source exceeds 1 sigma of the background noise",
    "source_flux": "lensed source flux in the VIS stamp (image units)",
    "n_pix_lens": "VIS pixels where the noiseless lens galaxy exceeds 1 sigma of the background noise",
    "lens_flux": "lens galaxy flux in the VIS stamp (image units)",
    "n_source_im": "images of the source centre (lens equation) falling on detected source pixels",
    "mag_eff": "effective magnification: lensed / unlensed source flux (0: no source)",
    "sb_contrast": "lensed source / lens galaxy flux over the source's detected VIS pixels (0: none)",
    "color_diff": "(VIS-H) of the lens minus (VIS-H) of the source (AB mag; 0: no source)",
    "n_gal_3": "companion galaxies within 3 arcsec of the lens",
    "n_gal_5": "companion galaxies within 5 arcsec of the lens",
    "n_gal_10": "companion galaxies within 10 arcsec of the lens",
    "halo_mass": "lens halo mass (M_sun)",
    "star_mass": "lens stellar mass (M_sun)",
    "mag_lens": "VIS AB magnitude of the lens galaxy (not a magnification)",
    "n_sources": "number of lensed sources (0: not a lens)",
}


def measure(
    object_id: int, scene: Scene, rendered: RenderedScene, vis_groups: dict[str, np.ndarray]
) -> dict[str, float]:
    """The 26 catalogue columns of one object, measured on its noiseless VIS maps and its mass model."""
    vis = band_observation("VIS")
    lens_map, source_map = vis_groups["lens"], vis_groups["source"]
    lens_pixels = lens_map > _vis_noise_cps(scene)
    x_crit, y_crit, n_crit, crit_area = _critical_curves(scene)
    row: dict[str, float] = dict(
        ID=int(object_id),
        x_crit=x_crit,
        y_crit=y_crit,
        source_ID=0,
        z_source=0.0,
        z_lens=scene.z_lens,
        mag_source=0.0,
        ein_area=math.pi * scene.theta_e**2,
        n_crit=n_crit,
        r_source=0.0,
        crit_area=crit_area,
        n_pix_source=0,
        source_flux=0.0,
        n_pix_lens=int(lens_pixels.sum()),
        lens_flux=float(lens_map.sum() * vis.flux_per_cps),
        n_source_im=0,
        mag_eff=0.0,
        sb_contrast=0.0,
        color_diff=0.0,
        n_gal_3=sum(r < 3.0 for r in scene.companion_radii),
        n_gal_5=sum(r < 5.0 for r in scene.companion_radii),
        n_gal_10=sum(r < 10.0 for r in scene.companion_radii),
        halo_mass=scene.halo_mass,
        star_mass=scene.star_mass,
        mag_lens=scene.mag_lens,
        n_sources=0,
    )
    if scene.source is not None:
        row.update(_source_columns(scene, rendered, lens_map, source_map))
    return row


def _source_columns(
    scene: Scene, rendered: RenderedScene, lens_map: np.ndarray, source_map: np.ndarray
) -> dict[str, float]:
    """A lens's source columns (a non-lens keeps their zeros)."""
    assert scene.source is not None
    vis = band_observation("VIS")
    source_pixels = source_map > _vis_noise_cps(scene)
    n_pix_source = int(source_pixels.sum())
    return dict(
        source_ID=scene.source_id,
        z_source=scene.z_source,
        mag_source=scene.mag_source,
        r_source=scene.source.body.r_eff,
        n_pix_source=n_pix_source,
        source_flux=float(source_map.sum() * vis.flux_per_cps),
        n_source_im=_visible_images(scene, source_pixels),
        mag_eff=rendered.magnification,
        sb_contrast=float(source_map[source_pixels].sum() / lens_map[source_pixels].sum()) if n_pix_source else 0.0,
        color_diff=scene.lens_vis_minus_h - scene.source_vis_minus_h,
        n_sources=1 + scene.extra_sources,
    )


def _vis_noise_cps(scene: Scene) -> float:
    """The object's VIS background sigma (e-/s): the detection threshold of n_pix_lens / n_pix_source."""
    scale = 1.0 if scene.noise is None else scene.noise["VIS"].sky_scale
    return band_observation("VIS").noise_cps * scale


def _vis_pixel(x: float, y: float) -> tuple[float, float]:
    """Arcsec (stamp centre = 0) -> 0-based VIS pixel coordinates (column, row)."""
    centre = (BANDS["VIS"].size - 1) / 2
    return x / CANVAS_PIXEL + centre, y / CANVAS_PIXEL + centre


def _critical_curves(scene: Scene) -> tuple[float, float, int, float]:
    """Centroid (VIS px), count and enclosed area (arcsec^2) of the regions of negative magnification,
    from the lens model's Hessian at the VIS pixel centres near the lens (where they all lie for
    q >= 0.55 and shear <= 0.08)."""
    center = scene.kwargs_lens[0]
    rows, cols = window((center["center_x"], center["center_y"]), 3.0 * scene.theta_e + 0.5)
    vis = slice(VIS_MARGIN, VIS_MARGIN + BANDS["VIS"].size)
    rows = slice(max(rows.start, vis.start), min(rows.stop, vis.stop))
    cols = slice(max(cols.start, vis.start), min(cols.stop, vis.stop))
    x, y = CANVAS_X[rows, cols], CANVAS_Y[rows, cols]
    f_xx, f_xy, _, f_yy = lens_model().hessian(x.ravel(), y.ravel(), list(scene.kwargs_lens))
    inside = ((1 - f_xx) * (1 - f_yy) - f_xy**2 < 0).reshape(x.shape)
    if not inside.any():
        x_pix, y_pix = _vis_pixel(center["center_x"], center["center_y"])
        return x_pix, y_pix, 0, 0.0
    _, n_regions = ndimage.label(inside)
    r, c = np.nonzero(inside)
    offset = rows.start - VIS_MARGIN, cols.start - VIS_MARGIN
    area = float(inside.sum() * CANVAS_PIXEL**2)
    return float(c.mean() + offset[1]), float(r.mean() + offset[0]), int(n_regions), area


def _visible_images(scene: Scene, source_pixels: np.ndarray) -> int:
    """Images of the source centre (analytical SIE + shear solver) that land on detected source pixels."""
    assert scene.source is not None
    x_img, y_img = _lens_solver().image_position_from_source(
        *scene.source.center, list(scene.kwargs_lens), solver="analytical", magnification_limit=0.1
    )
    size = source_pixels.shape[0]
    count = 0
    for x, y in zip(np.atleast_1d(x_img), np.atleast_1d(y_img), strict=False):
        col, row = (round(v) for v in _vis_pixel(float(x), float(y)))
        count += bool(0 <= row < size and 0 <= col < size and source_pixels[row, col])
    return count


@cache
def _lens_solver() -> LensEquationSolver:
    return LensEquationSolver(lens_model())
