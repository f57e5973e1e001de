"""The challenge-format simulator (lenstronomy), split by concern.

``instrument`` (units, band depths, the render canvas) -> ``light`` (surface-brightness shapes) ->
``scene`` (drawing one object's parameters) -> ``render`` (unit maps, PSF, band grids, noise) ->
``measure`` (the catalogue columns) and ``quirks`` (the real data's image defects) -> ``writer``
(one object from its ID's random stream, FITS bytes, the Ray fan-out, the catalogue: ``simulate_dataset``).
"""
