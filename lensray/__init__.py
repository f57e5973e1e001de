"""lensray: strong-lens finding in Euclid-like cutouts with CNNs, scaled out on Ray.

In a notebook::

    import lensray
    run = lensray.load_best("s3://bucket/experiments/lastro-search")   # or lensray.load_run(run_folder)
    scores = run.predict(images)
    model = lensray.load_model("s3://bucket/models/lastro-1")   # an exported model (lensray export)
    probabilities = model.predict_cutouts([{"VIS": "vis.fits", "Y": "y.fits", "J": "j.fits", "H": "h.fits"}])
"""

from lensray._version import __version__

__all__ = ["__version__", "load_best", "load_model", "load_run"]


def __getattr__(name: str):  # lazy: `import lensray` stays light (no torch/Ray until asked)
    if name in ("load_run", "load_best"):
        from lensray import runs

        return getattr(runs, name)
    if name == "load_model":
        from lensray.evaluate.export import load_model

        return load_model
    raise AttributeError(f"module 'lensray' has no attribute {name!r}")
