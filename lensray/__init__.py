"""lensray: strong-lens finding in Euclid-like cutouts with CNNs, scaled out on Ray."""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import lensray` stays light (no torch/Ray until asked)
    if name in ("load_run", "load_best"):
        from lensray import api

        return getattr(api, name)
    raise AttributeError(f"module 'lensray' has no attribute {name!r}")
