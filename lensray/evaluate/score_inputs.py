"""A scoring job's checked inputs: the catalogue's IDs and columns, the checkpoint (or ensemble) and what its
network takes, the images and the cutouts' layout (``ScoreInputs``, built by ``prepare_scoring``).

The catalogue is any table ``sky.catalog.load_catalog`` reads (CSV, FITS, ECSV, Parquet; the ID column
``DataConfig.id_column``); candidates carry its ``coord_columns`` as ``ra``/``dec`` and its ``keep_columns``.
Everything here is checked before any Ray work (``score.py`` runs the job).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from lensray import storage
from lensray.config import DataConfig
from lensray.errors import CatalogError, ScoreError
from lensray.evaluate.ensemble import EnsembleSpec, load_model
from lensray.evaluate.inference import checkpoint_input
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile
from lensray.runs import ModelInput

# --- catalogue IDs --------------------------------------------------------------------------------


def read_catalog_columns(url: str, data: DataConfig | None = None) -> tuple[np.ndarray, list[int], pd.DataFrame]:
    """``(unique IDs in file order, repeated IDs, candidate columns)`` of a catalogue: the challenge CSV or
    any CSV/FITS/ECSV/Parquet table with ``data.id_column`` (default ``ID``; ``#`` comments allowed in CSV)
    -- a survey list needs no labels. The candidate columns are ``id``, ``ra``/``dec`` (with
    ``data.coord_columns``) and ``data.keep_columns``, one row per unique ID."""
    from lensray.sky.catalog import load_catalog

    try:
        catalog = load_catalog(url, data or DataConfig())
    except CatalogError as exc:
        raise ScoreError(str(exc)) from None
    return catalog.ids, sorted({d.object_id for d in catalog.duplicates}), catalog.candidate_columns()


def read_ids(url: str, data: DataConfig | None = None) -> tuple[np.ndarray, list[int]]:
    """``(unique IDs in file order, repeated IDs)`` of a catalogue (see ``read_catalog_columns``)."""
    ids, repeated, _ = read_catalog_columns(url, data)
    return ids, repeated


# --- the job's inputs ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ScoreInputs:
    """A scoring job's checked inputs: the checkpoint, what its network takes, the catalogue's IDs."""

    checkpoint_url: str
    images_url: str
    catalog_url: str
    prepared: ModelInput
    nan_policy: str
    ids: np.ndarray  # unique, in catalogue order
    repeated: tuple[int, ...]  # IDs listed more than once (scored once)
    started: float  # perf_counter when the job began: wall times count from it
    columns: pd.DataFrame | None = None  # id + ra/dec + kept catalogue columns, joined to the candidates
    profile: SurveyProfile = PROFILES[DEFAULT_PROFILE]  # the cutouts' layout: the training store's
    ensemble: EnsembleSpec | None = None  # an ensemble's members (``checkpoint_url`` is then its label)

    @property
    def model(self) -> str | EnsembleSpec:
        """What the actors load: the checkpoint, or the ensemble."""
        return self.ensemble or self.checkpoint_url


def profile_entry(inputs: ScoreInputs) -> dict[str, Any]:
    """The cutouts' layout, recorded when it is not the challenge's (whose jobs record what they always did)."""
    if inputs.profile == PROFILES[DEFAULT_PROFILE]:
        return {}
    return {"profile": inputs.profile.model_dump(mode="json")}


def prepare_scoring(
    checkpoint_url: str | EnsembleSpec,
    images_url: str,
    catalog_url: str,
    out_url: str | None = None,
    nan_policy: str | None = None,
    data: DataConfig | None = None,
    profile: SurveyProfile | None = None,
) -> ScoreInputs:
    """Check everything that can fail before any Ray work: the checkpoint, the URLs, the catalogue (read
    with ``data``'s catalogue options: id, coordinate and kept columns, format). ``checkpoint_url``: a
    checkpoint, a run folder (its best checkpoint) or an ensemble, whose members share their input. The
    cutouts' layout is the training store's profile; ``profile`` (``--profile``), when given, must be the same."""
    from lensray.runs import load_run, resolve_checkpoint

    started = time.perf_counter()
    ensemble = checkpoint_url if isinstance(checkpoint_url, EnsembleSpec) else None
    checkpoint_url = ensemble.label if ensemble else resolve_checkpoint(checkpoint_url)
    runs = load_model(ensemble).runs if ensemble else [load_run(checkpoint_url)]  # fail fast on a bad checkpoint
    run = runs[0]
    prepared, survey = checkpoint_input(ensemble.checkpoints[0] if ensemble else checkpoint_url, run.config, profile)
    storage.check_reachable(images_url)
    if out_url is not None:
        storage.check_reachable(out_url, must_exist=False)
    ids, repeated, columns = read_catalog_columns(catalog_url, data)
    if ids.size == 0:
        raise ScoreError(f"catalogue {catalog_url} lists no IDs")
    return ScoreInputs(
        checkpoint_url=checkpoint_url,
        images_url=images_url,
        catalog_url=catalog_url,
        prepared=prepared,
        nan_policy=nan_policy or run.config.data.nan,
        ids=ids,
        repeated=tuple(repeated),
        started=started,
        columns=columns if columns.shape[1] > 1 else None,
        profile=survey,
        ensemble=ensemble,
    )
