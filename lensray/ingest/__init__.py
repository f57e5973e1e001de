"""Ingest: preprocessing of raw cutouts, the Zarr store, and the Ray Data job that fills it."""
