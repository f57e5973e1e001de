"""The version of lensray, recorded in every store and checkpoint."""

__version__ = "0.1.0"
