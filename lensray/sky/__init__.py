"""Sky data: bands and their grids, catalogues and label rules, FITS cutouts, D4 symmetry."""
