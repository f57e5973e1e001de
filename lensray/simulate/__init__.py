"""The challenge-format simulator (lenstronomy), split by concern.

``instrument`` (units, band depths, the render canvas) -> ``light`` (surface-brightness shapes) ->
``scene`` (drawing one object's parameters) -> ``render`` (unit maps, PSF, band grids, noise) ->
``measure`` (the catalogue columns) and ``quirks`` (the real data's image defects) -> ``writer``
(one object from its ID's random stream, FITS bytes, the Ray fan-out, the catalogue: ``simulate_dataset``).
A survey profile other than the challenge's (``--profile``): ``survey`` observes the same rendered scene in
the profile's bands (colour, PSF and depth from each band's wavelength, flux-conserving resampling) and
``layout`` writes its files (multi-extension, IMAGE/MASK/VARIANCE, ``.fz``, TAN WCS).
"""
