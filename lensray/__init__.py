"""lensray: strong-lens finding in Euclid-like cutouts with CNNs, scaled out on Ray.

In a notebook::

    import lensray
    run = lensray.load_best("s3://bucket/experiments/lastro-search")   # or lensray.load_run(run_folder)
    scores = run.predict(images)
"""

from lensray._version import __version__

__all__ = ["__version__", "load_best", "load_run"]


def __getattr__(name: str):  # lazy: `import lensray` stays light (no torch/Ray until asked)
    if name in ("load_run", "load_best"):
        from lensray import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'lensray' has no attribute {name!r}")
