"""Exported models: a trained network and its input contract, loadable anywhere with no pickle, store or Ray.

``export_model`` writes a folder (local path or any URL storage writes) from a run folder, a checkpoint or a
search (its best trial's best checkpoint, the rule of ``load_best``):

* ``model.safetensors``: the network's weights (its ``state_dict``, plain tensors, safetensors format);
* ``model.json``: the network (name and its config section), the input contract (the survey profile, bands
  with their pixel scales and stamp sizes from it, the preprocessing mode and parameters, crop/bin, dtype, NaN policy, input shape),
  the lensray version, the source run and its validation (and, where given, test) AUC;
* ``config.yaml``: the run's resolved config, as its checkpoint holds it.

``load_model`` reads it back (JSON and safetensors only) into an ``ExportedModel`` whose ``predict_cutouts``
scores raw FITS files (read as the profile says: each band's HDU, one read per file shared by several
bands) or raw flux arrays through the same reader checks (``sky.fits.decode_hdus``), transform
(``ingest.preprocess.preprocess_cutouts``) and forward pass (``evaluate.inference.predict_tta`` over
``models.inference.predict``) as ``lensray score``: the same numbers, and the same named errors for bad inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from lensray import storage
from lensray._version import __version__
from lensray.config import ModelConfig, PreprocessConfig
from lensray.errors import CheckpointError, PreprocessError, ScoreError, SearchError
from lensray.evaluate.inference import check_tta, checkpoint_input, predict_tta
from lensray.ingest.preprocess import describe, output_shape, preprocess_cutouts
from lensray.models import MODELS, build_model, describe_model, input_pixel_scale, model_section
from lensray.models.inference import predict
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile, recorded_profile
from lensray.runs import (
    CONFIG_FILE,
    TUNE_CONFIG_FILE,
    best_checkpoint,
    is_checkpoint,
    load_run,
    resolve_checkpoint,
    summarise_experiment,
)
from lensray.sky.bands import stamp_problem
from lensray.sky.fits import NAN_POLICIES, Cutout, CutoutError, check_image, decode_hdus

WEIGHTS_FILE = "model.safetensors"
MODEL_FILE = "model.json"
FORMAT = "lensray-model"
FORMAT_VERSION = 1  # bump when model.json changes in a way an older reader would misread
PREPROCESS_KEYS = ("mode", "upsample", "asinh_softening", "border", "crop", "bin", "dtype")
VAL_METRICS = ("val_auc", "val_acc", "val_tpr0", "val_tpr10", "val_loss")
DEFAULT_BATCH = 64


# --- export -----------------------------------------------------------------------------------------


def resolve_source(url: str) -> tuple[str, dict[str, Any]]:
    """``(checkpoint URL, what it came from)`` for a search, a checkpoint or a run folder (its best checkpoint)."""
    url = url.rstrip("/")
    if storage.exists(storage.join(url, TUNE_CONFIG_FILE)):
        summary = summarise_experiment(url)
        if summary.best is None:
            raise SearchError(f"{url}: no trial reported val_auc yet: nothing to export")
        try:
            best = best_checkpoint(summary.best["run_url"])
        except CheckpointError as exc:
            raise SearchError(f"{url}: best trial {summary.best['trial_id']}: {exc}") from exc
        return best.url, {"kind": "search", "url": url, "trial_id": summary.best["trial_id"]}
    if is_checkpoint(url):
        return url, {"kind": "checkpoint", "url": url}
    return resolve_checkpoint(url), {"kind": "run", "url": url}


def _evaluation(evaluation_url: str | None, checkpoint_url: str) -> dict[str, Any]:
    """``test_auc`` (None unless known) and the ``lensray evaluate`` record of this checkpoint it came from."""
    if evaluation_url is None:
        return {"test_auc": None}
    url = evaluation_url if evaluation_url.endswith(".json") else storage.join(evaluation_url, "metrics.json")
    try:
        record = json.loads(storage.read_bytes(url))
        checkpoint, split, auc, tta = record["checkpoint"], record["split"], record["metrics"]["auc"], record["tta"]
    except FileNotFoundError:
        raise CheckpointError(f"{url} is missing: not a `lensray evaluate` output folder") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"{url}: not a `lensray evaluate` metrics.json (no checkpoint, split, metrics.auc)"
        ) from None
    if checkpoint.rstrip("/") != checkpoint_url.rstrip("/"):
        raise CheckpointError(f"{url} evaluates {checkpoint}, not the exported checkpoint {checkpoint_url}")
    evaluation = {"url": url, "split": split, "auc": auc, "tta": tta, "store": record.get("store")}
    return {"test_auc": auc if split == "test" else None, "evaluation": evaluation}


def model_record(run: Any, source: dict[str, Any], evaluation_url: str | None, weights: bytes) -> dict[str, Any]:
    """``model.json``'s content for a loaded ``runs.Run``."""
    prepared, survey = checkpoint_input(run.checkpoint_url, run.config)
    preprocess = prepared.preprocess
    metrics = {key: run.metrics[key] for key in VAL_METRICS if run.metrics.get(key) is not None}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lensray_version": __version__,
        "network": {
            "name": run.config.model.name,
            "config": model_section(run.config.model).model_dump(mode="json"),
            "description": describe_model(run.config.model),
        },
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights).hexdigest()},
        "input": {
            "profile": survey.model_dump(mode="json"),  # the raw cutouts' layout: files, HDUs, grids
            "bands": list(prepared.bands),
            "pixel_scales": {band: survey.band(band).pixel_scale for band in prepared.bands},  # arcsec/px
            "stamp_sizes": {band: survey.band(band).size for band in prepared.bands},  # nominal native side, px
            "channels": prepared.channels,
            "size": prepared.size,
            "dtype": preprocess.dtype,
            "nan_policy": run.config.data.nan,
            "preprocess": preprocess.model_dump(mode="json", include=set(PREPROCESS_KEYS)),
            "transform": describe(preprocess, survey, prepared.bands),  # the full record; load_model checks it
        },
        "source": {
            **source,
            "checkpoint": run.checkpoint_url,
            "epoch": run.epoch,
            "training_store": prepared.store,
            **metrics,
            **_evaluation(evaluation_url, run.checkpoint_url),
        },
        "notes": list(prepared.notes),
    }


@dataclass(frozen=True)
class ExportSummary:
    out_url: str
    files: tuple[str, ...]
    record: dict[str, Any]

    def __str__(self) -> str:
        source, network, contract = self.record["source"], self.record["network"], self.record["input"]
        auc = source.get("val_auc")
        lines = [
            f"exported {network['description']} from {source['checkpoint']} (epoch {source['epoch']}, "
            f"val AUC {'n/a' if auc is None else f'{auc:.4f}'}) to {self.out_url}",
            f"  input: bands {', '.join(contract['bands'])} -> {contract['channels']}x{contract['size']}x"
            f"{contract['size']} ({contract['preprocess']['mode']}, crop {contract['preprocess']['crop']}, "
            f"bin {contract['preprocess']['bin']}, {contract['dtype']}, NaN policy {contract['nan_policy']})",
        ]
        lines += [f"  {url}" for url in self.files]
        lines.append(f"  in Python: lensray.load_model({self.out_url!r}).predict_cutouts(items)")
        return "\n".join(lines)


def export_model(source_url: str, out_url: str, *, evaluation: str | None = None) -> ExportSummary:
    """Export a run folder, checkpoint or search (see ``resolve_source``) into ``out_url``.

    ``evaluation``: a ``lensray evaluate`` output folder (or its metrics.json) of the same checkpoint: recorded
    as ``source.evaluation`` (split, AUC, TTA, store), its AUC as ``source.test_auc`` when of the test split.
    The files are written weights first, ``model.json`` last, so a folder with a ``model.json`` is complete.
    """
    from safetensors.torch import save

    checkpoint_url, source = resolve_source(source_url)
    run = load_run(checkpoint_url, device="cpu")
    # Plain contiguous CPU tensors: safetensors stores nothing else, and a state_dict may hold views.
    weights = save({key: value.detach().cpu().contiguous() for key, value in run.model.state_dict().items()})
    record = model_record(run, source, evaluation, weights)
    out_url = out_url.rstrip("/")
    files = tuple(storage.join(out_url, name) for name in (WEIGHTS_FILE, CONFIG_FILE, MODEL_FILE))
    storage.check_reachable(out_url, must_exist=False)
    storage.write_bytes(files[0], weights)
    storage.write_bytes(files[1], storage.read_bytes(storage.join(checkpoint_url, CONFIG_FILE)))
    storage.write_bytes(files[2], json.dumps(record, indent=1).encode())
    return ExportSummary(out_url=out_url, files=files, record=record)


# --- load ------------------------------------------------------------------------------------------------


def _network_config(record: dict[str, Any], url: str) -> ModelConfig:
    network = record.get("network")
    name = network.get("name") if isinstance(network, dict) else None
    if name not in MODELS:
        raise CheckpointError(f"{url}: unknown network {name!r}; this lensray builds {', '.join(sorted(MODELS))}")
    try:
        return ModelConfig.model_validate({"name": name, name: network.get("config") or {}})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CheckpointError(f"{url}: network config of {name!r} is unusable at {where}: {first['msg']}") from None


@dataclass(frozen=True)
class _Contract:
    bands: tuple[str, ...]
    preprocess: PreprocessConfig
    nan_policy: str
    channels: int
    size: int
    profile: SurveyProfile


def _input_contract(record: dict[str, Any], url: str) -> _Contract:
    """The exported input contract, checked against what this lensray computes (an export without a
    profile is of the challenge layout)."""
    contract = record.get("input")
    try:
        bands = tuple(contract["bands"])
        channels, size, nan_policy = int(contract["channels"]), int(contract["size"]), contract["nan_policy"]
        preprocess = PreprocessConfig(**{key: contract["preprocess"][key] for key in PREPROCESS_KEYS})
        profile = recorded_profile(contract.get("profile"))
    except (KeyError, TypeError, ValueError) as exc:  # ValidationError is a ValueError
        raise CheckpointError(f"{url}: no usable input contract ({type(exc).__name__}: {exc})") from None
    for band in bands:
        spec = profile.band(band) if band in profile.band_names else None
        scale = (contract.get("pixel_scales") or {}).get(band)
        stamp = (contract.get("stamp_sizes") or {}).get(band)
        if spec is None or (scale, stamp) != (spec.pixel_scale, spec.size):
            known = (
                f"not in profile {profile.name}" if spec is None else f"{spec.size} px at {spec.pixel_scale}″/px here"
            )
            raise CheckpointError(f"{url}: band {band} is {stamp} px at {scale}″/px in the export, {known}")
    if nan_policy not in NAN_POLICIES or channels != len(bands):
        raise CheckpointError(f"{url}: nan_policy {nan_policy!r} / {channels} channels for bands {list(bands)}")
    rebuilt, recorded = describe(preprocess, profile, bands), contract.get("transform") or {}
    differing = sorted(k for k in set(rebuilt) | set(recorded) if rebuilt.get(k) != recorded.get(k))
    if differing:
        details = ", ".join(f"{k}: exported {recorded.get(k)!r}, this lensray {rebuilt.get(k)!r}" for k in differing)
        raise CheckpointError(f"{url}: this lensray cannot reproduce the exported transform ({details})")
    if list(output_shape(preprocess, profile)) != [size, size]:
        raise CheckpointError(
            f"{url}: transform output {output_shape(preprocess, profile)} != network input size {size}"
        )
    return _Contract(bands, preprocess, nan_policy, channels, size, profile)


def _read_weights(url: str, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    data = storage.read_bytes(storage.join(url, WEIGHTS_FILE))
    expected = (record.get("weights") or {}).get("sha256")
    if expected != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"{storage.join(url, WEIGHTS_FILE)} is not the file {MODEL_FILE} was exported with")
    try:
        return load(data)
    except Exception as exc:  # whatever the parser says, the file is unusable
        raise CheckpointError(f"{storage.join(url, WEIGHTS_FILE)} is not a safetensors file ({exc})") from None


def load_model(url: str, device: str | torch.device = "cpu") -> ExportedModel:
    """An exported model folder (``export_model``; local path or URL) on ``device`` ("cpu", "cuda", "auto").

    Reads ``model.json`` and ``model.safetensors`` only: no pickle, so a folder from anywhere cannot run code.
    CheckpointError naming the folder when a file is missing, tampered with or from an incompatible lensray.
    """
    url = str(url).rstrip("/")
    json_url = storage.join(url, MODEL_FILE)
    try:
        record = json.loads(storage.read_bytes(json_url))
    except FileNotFoundError:
        raise CheckpointError(f"{json_url} is missing: {url} is not an exported lensray model") from None
    except ValueError:
        raise CheckpointError(f"{json_url} is not valid JSON: the file is corrupt or truncated") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{json_url} is not a lensray model record (format {FORMAT!r})")
    if not isinstance(record.get("format_version"), int) or record["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{json_url}: format version {record.get('format_version')!r}; this lensray reads <= 1")
    config = _network_config(record, json_url)
    contract = _input_contract(record, json_url)
    # The pixel scales the two-branch net splits and pools its channels by, as in training.
    scale = input_pixel_scale(record["input"].get("transform"))
    network = build_model(config, contract.channels, contract.size, scale)
    try:
        network.load_state_dict(_read_weights(url, record))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{url}: the weights do not fit the network {MODEL_FILE} describes ({first})") from None
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    network.to(device).eval()
    return ExportedModel(
        url, record, network, contract.bands, contract.preprocess, contract.nan_policy, device, contract.profile
    )


# --- predicting --------------------------------------------------------------------------------------------


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _per_object(items: Any, bands: Sequence[str], profile: SurveyProfile) -> list[Mapping[str, Any]]:
    """``items`` as one ``{band: path, URL or 2-D array}`` per object."""
    if isinstance(items, (np.ndarray, torch.Tensor)):
        array = np.asarray(items)
        if array.ndim != 4 or array.shape[1] != len(bands):
            raise ScoreError(f"raw images must be (N, {len(bands)}, H, W) for bands {list(bands)}, got {array.shape}")
        sizes = {profile.band(band).size for band in bands}
        if len(sizes) > 1:
            raise ScoreError(
                f"bands {list(bands)} have native stamps of different sizes ({sorted(sizes)} px): one (N, C, H, W) "
                "array cannot hold them; pass {band: (N, H, W) array} or a list of {band: array or path}"
            )
        return [dict(zip(bands, image, strict=True)) for image in array]
    if isinstance(items, Mapping):
        if all(_is_path(value) for value in items.values()):
            return [items]  # one object's band files
        lengths = {band: len(stack) for band, stack in items.items()}
        if len(set(lengths.values())) > 1:
            raise ScoreError(f"band stacks of different lengths: {lengths}")
        n = next(iter(lengths.values()), 0)
        return [{band: stack[k] for band, stack in items.items()} for k in range(n)]
    if isinstance(items, Sequence) and all(isinstance(item, Mapping) for item in items):
        return list(items)
    raise ScoreError("items must be a list of {band: path or array}, a {band: (N, H, W)} mapping or (N, C, H, W)")


@dataclass
class ExportedModel:
    """A network in eval mode with the input contract it was exported with (see ``load_model``)."""

    url: str
    info: dict[str, Any]  # model.json
    network: nn.Module
    bands: tuple[str, ...]
    preprocess: PreprocessConfig
    nan_policy: str
    device: torch.device
    profile: SurveyProfile = PROFILES[DEFAULT_PROFILE]  # the raw cutouts' layout (bands' HDUs, grids)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, S, S): what ``predict`` takes."""
        return (len(self.bands), *output_shape(self.preprocess, self.profile))

    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Lens probabilities for (N, C, S, S) images already preprocessed (``prepare``), like ``Run.predict``."""
        tensor = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not torch.is_tensor(images) else images
        tensor = tensor.float()
        if tuple(tensor.shape[1:]) != self.input_shape:
            raise ScoreError(f"{self.url}: images must be (N, {self.input_shape}), got {tuple(tensor.shape)}")
        batches = (tensor[i : i + batch_size] for i in range(0, len(tensor), batch_size))
        return predict(self.network, batches, device=self.device)

    def read(self, items: Any, ids: Sequence[int] | None = None, nan_policy: str | None = None) -> list[Cutout]:
        """Raw cutouts (see ``predict_cutouts``), checked like ``lensray score`` reads them: CutoutError naming
        the object (``ids``, default its position), band and file for a missing band, an unreadable file, a
        wrong stamp size, a blank band, or NaN pixels under the ``reject`` policy."""
        objects = _per_object(items, self.bands, self.profile)
        ids = list(range(len(objects))) if ids is None else [int(i) for i in ids]
        if len(ids) != len(objects):
            raise ScoreError(f"{len(ids)} ids for {len(objects)} objects")
        policy = nan_policy or self.nan_policy
        return [self._read_one(obj, object_id, policy) for obj, object_id in zip(objects, ids, strict=True)]

    def _read_one(self, item: Mapping[str, Any], object_id: int, nan_policy: str) -> Cutout:
        decoded: dict[str, tuple[np.ndarray, int, Any]] = {}
        files: dict[str, dict[str, int | str]] = {}  # path -> {band: HDU}: a file shared by bands is read once
        urls: dict[str, str] = {}
        for band in self.bands:
            value = item.get(band)
            if value is None:
                raise CutoutError(object_id, band, "<not given>", "missing", f"no {band} among {sorted(item)}")
            if _is_path(value):
                urls[band] = str(value)
                files.setdefault(str(value), {})[band] = self.profile.band(band).hdu
            else:  # the same checks as a file's pixels
                urls[band] = f"<array of object {object_id}>"
                decoded[band] = (*check_image(np.asarray(value), object_id, band, urls[band], nan_policy), None)
        for url, hdus in files.items():
            try:
                data = storage.read_bytes(url)
            except FileNotFoundError:
                raise CutoutError(object_id, next(iter(hdus)), url, "missing", "no such file") from None
            decoded.update(decode_hdus(data, object_id, url, hdus, nan_policy))
        for band in self.bands:
            problem = stamp_problem(self.profile.band(band), decoded[band][0].shape)
            if problem:  # as sky.fits.read_cutout: a wrong-size stamp is refused, never resampled
                raise CutoutError(object_id, band, urls[band], "shape", f"stamp is {decoded[band][0].shape}, {problem}")
        return Cutout(
            object_id=object_id,
            bands={band: decoded[band][0] for band in self.bands},
            nan_pixels={band: decoded[band][1] for band in self.bands},
            wcs={band: decoded[band][2] for band in self.bands},
        )

    def prepare(self, cutouts: Sequence[Cutout]) -> np.ndarray:
        """Read cutouts -> (N, C, S, S) float32 network inputs, by ``lensray score``'s transform; PreprocessError
        naming the object when one cannot become an image (e.g. an extreme pixel)."""
        prepared = preprocess_cutouts(cutouts, self.preprocess, self.bands, profile=self.profile)
        if prepared.rejects:
            raise PreprocessError(prepared.rejects[0].message)
        return np.asarray(prepared.images, dtype=np.float32)

    def predict_cutouts(
        self,
        items: Any,
        tta: str | None = "none",
        *,
        ids: Sequence[int] | None = None,
        nan_policy: str | None = None,
        batch_size: int = DEFAULT_BATCH,
    ) -> np.ndarray:
        """Lens probabilities (N,) for raw cutouts, in the order given, as ``lensray score`` computes them.

        ``items``: a list of ``{band: path or URL}`` (FITS, the image in the band's HDU of the profile; bands
        naming one multi-extension file read it once) or ``{band: 2-D array}`` per
        object; a ``{band: (N, H, W) array}`` mapping; or, when every band has one stamp size, an
        (N, C, H, W) array of raw fluxes in ``self.bands`` order. ``tta="d4"`` averages the 8 rotations and
        flips. ``ids`` name the objects in errors (default: their positions); ``nan_policy`` overrides the
        exported one. A bad object raises (see ``read``) instead of being skipped.
        """
        tta = check_tta(tta)
        objects = _per_object(items, self.bands, self.profile)
        ids = list(range(len(objects))) if ids is None else list(ids)
        scores = []
        for first in range(0, len(objects), batch_size):
            chunk = slice(first, first + batch_size)
            images = self.prepare(self.read(objects[chunk], ids[chunk], nan_policy))
            scores.append(predict_tta(self, images, tta, batch_size=batch_size)[0])
        return np.concatenate(scores) if scores else np.empty(0)
