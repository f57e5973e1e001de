"""Every error lensray raises on purpose derives from ``LensrayError``; its message names the object.

The CLI turns any of them into one line on stderr and exit status 1. Each also derives from the builtin
that describes it best (``ValueError`` for bad input, ``OSError`` for storage, ``RuntimeError`` for a job
that could not finish), so code that catches those keeps working.
"""

from __future__ import annotations

import re


class LensrayError(Exception):
    """Base of every lensray error; the message names the file, URL, key or ID at fault."""


class ConfigError(LensrayError, ValueError):
    """A configuration file or override is invalid; the message names the offending key."""


class StorageError(LensrayError, OSError):
    """A URL cannot be reached, or its bucket or credentials are wrong; the message names the URL."""


class CatalogError(LensrayError, ValueError):
    """The catalogue cannot be read; the message names the URL and, where known, the line and column."""


class PreprocessError(LensrayError, ValueError):
    """A cutout cannot be preprocessed; the message names the object ID (when known) and the band."""


class StoreError(LensrayError, ValueError):
    """A store, or data handed to it, is not what the store's layout requires; names the URL."""


class StoreMismatchError(StoreError):
    """An existing store was created with different parameters; names every differing key."""


class StoreIncompleteError(StoreError):
    """Shards are missing, or data was requested from a store that is not finalized yet."""


class IngestError(LensrayError, RuntimeError):
    """The ingest could not complete (strict mode with rejects, or unusable input)."""


class CheckpointError(LensrayError, RuntimeError):
    """A run folder has no usable checkpoint (no history, no finite metric, none kept); names the URL."""


class SearchError(LensrayError, RuntimeError):
    """A search cannot start, cannot be read, or none of its trials produced a result; says why."""


class FeedError(LensrayError, ValueError):
    """The store, split or sampling parameters cannot make the batches asked for; says why."""


class SanityCheckError(LensrayError, RuntimeError):
    """The model could not overfit a small fixed batch: full training would not learn either."""


class TrainError(LensrayError, RuntimeError):
    """Training cannot start or did not finish; the message says why."""


class EvaluateError(LensrayError, ValueError):
    """The run, store or split cannot be evaluated; the message names which and why."""


class ScoreError(LensrayError, ValueError):
    """Scoring cannot run (unusable checkpoint, catalogue or output); the message names the object."""


class GradeError(LensrayError, ValueError):
    """A grades file, candidates file or grading option is unusable; the message names the file or option."""


class Interrupted(LensrayError):
    """A long job was stopped (Ctrl-C); the message says how to continue it. The CLI exits with 130."""


# --- finding lensray's error inside the wrappers of Ray (and of ``raise ... from``) -------------------


def is_ray_wrapper(exc: BaseException) -> bool:
    """Whether ``exc`` is one of Ray's wrappers (RayTaskError, TrainingFailedError, WorkerGroupError...).

    Decided by the classes' module, so this layer needs no Ray import: a RayTaskError is also an
    instance of its cause's class (e.g. StorageError), yet it is the wrapper, never the error to report.
    """
    return any(cls.__module__.split(".", 1)[0] == "ray" for cls in type(exc).__mro__)


def _carried(exc: BaseException) -> BaseException | None:
    """What ``exc`` carries: a failed Train worker's error (the lowest rank), the Train controller's, a
    task's or actor's cause, or the exception it was raised from."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]
    for attribute in ("controller_failure", "cause"):
        inner = getattr(exc, attribute, None)
        if isinstance(inner, BaseException):
            return inner
    return exc.__cause__


def causes(exc: BaseException) -> list[BaseException]:
    """``exc``, then what it carries, then what that carries..., each once."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = _carried(current)
    return chain


def find_cause(exc: BaseException, kinds: tuple[type[BaseException], ...] = (LensrayError,)) -> BaseException | None:
    """The first error of ``kinds`` in ``causes(exc)`` that is not a Ray wrapper, else a lensray error that
    a wrapper holds only as text (``from_worker_text``); None when there is none."""
    chain = causes(exc)
    found = next((e for e in chain if isinstance(e, kinds) and not is_ray_wrapper(e)), None)
    if found is None:
        rebuilt = (from_worker_text(e) for e in chain if is_ray_wrapper(e))
        found = next((e for e in rebuilt if e is not None and isinstance(e, kinds)), None)
    return found


# ``lensray.errors.StorageError: cannot read s3://...``: the last line of a Python traceback's exception.
_WORKER_ERROR_LINE = re.compile(r"^lensray\.errors\.([A-Za-z]+): (.+)$", re.MULTILINE)


def from_worker_text(wrapper: BaseException) -> LensrayError | None:
    """The lensray error a Ray wrapper names only in its text: Ray Data wraps a failed UDF's exception in
    UserCodeException and sends the driver its traceback as text, the exception object itself is lost.
    The last (outermost) one is rebuilt from its class name (looked up among this module's errors only)
    and its message."""
    for name, message in reversed(_WORKER_ERROR_LINE.findall(str(wrapper))):
        kind = globals().get(name)
        if isinstance(kind, type) and issubclass(kind, LensrayError):
            return kind(message.strip())
    return None


def root_cause(exc: BaseException) -> BaseException:
    """The error to tell the user about ``exc``: lensray's own error inside it if there is one, else the
    first that is not a Ray wrapper (the user code's exception), else ``exc``."""
    return find_cause(exc) or find_cause(exc, (BaseException,)) or exc
