"""The challenge catalogue: reading it, label rules (paper, official, challenge), duplicate IDs."""

from __future__ import annotations

CATALOG_NAME = "image_catalog2.0train.csv"

# The 26 named columns after the unnamed row index (27 columns in all), in file order.
COLUMNS: tuple[str, ...] = (
    "ID", "x_crit", "y_crit", "source_ID", "z_source", "z_lens", "mag_source", "ein_area", "n_crit",
    "r_source", "crit_area", "n_pix_source", "source_flux", "n_pix_lens", "lens_flux", "n_source_im",
    "mag_eff", "sb_contrast", "color_diff", "n_gal_3", "n_gal_5", "n_gal_10", "halo_mass", "star_mass",
    "mag_lens", "n_sources",
)  # fmt: skip
