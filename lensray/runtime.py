"""How lensray jobs run: the Ray cluster every job starts or joins (one place, so every job gets the same fix),
how much Ray says, and progress bars."""

from __future__ import annotations

import logging
import os
import socket

from tqdm import tqdm


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (``ray job submit`` sets it), else start a local one.

    A local cluster is started on a known port with RAY_ADDRESS in its workers' environment: Ray
    Train's placement-group cleaner, which frees the CPUs of a trial that ASHA stopped, finds its
    cluster through the state API, and on a machine running several Ray instances it cannot guess
    which is its own (the trial's CPUs stay reserved and the next trial waits for ever).
    """
    import ray

    if ray.is_initialized():
        return
    _hide_ray_notices()
    # Ray's own chatter (worker logs, per-report lines) only under -v; lensray prints its own progress.
    chatter = {"log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**chatter)
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pinned = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_GCS_SERVER_PORT": str(port)}
    os.environ.update(pinned)
    try:
        ray.init(address="local", **chatter)  # "local": start one here, whatever RAY_ADDRESS says
    finally:
        for key in pinned:
            os.environ.pop(key, None)


class _RayNotices(logging.Filter):
    """Drops Ray's notices that ask nothing of the user, unless -v: that a new local cluster has token
    authentication on (a warning that it is *off* still shows), and that Ray Data's bars are off (lensray
    draws its own)."""

    NOTICES = ("Token authentication is enabled", "Progress bars disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or not record.getMessage().startswith(self.NOTICES)


def _hide_ray_notices() -> None:
    for name in ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RayNotices) for f in logger.filters):
            logger.addFilter(_RayNotices())
    # Ray Data's per-dataset "Starting execution" / "Execution plan" lines: lensray shows its own progress.
    # Importing ray.data configures its loggers (level INFO), so it is imported before the level is set.
    import ray.data  # noqa: F401

    logging.getLogger("ray.data").setLevel(logging.DEBUG if verbose() else logging.WARNING)


def verbose() -> bool:
    """True under ``lensray -v``: the CLI sets the ``lensray`` logger to DEBUG, and Ray's own output
    (worker logs, Train's per-report lines, Tune's tables) is then shown too."""
    return logging.getLogger("lensray").isEnabledFor(logging.DEBUG)


def quiet() -> bool:
    """True under ``lensray -q``: the ``lensray`` logger is above INFO and progress bars are off."""
    return not logging.getLogger("lensray").isEnabledFor(logging.INFO)


def progress(total: int, desc: str, unit: str = "it") -> tqdm:
    """A progress bar on stderr for a long step: drawn on a terminal, silent in logs and under -q."""
    return tqdm(total=total, desc=desc, unit=unit, disable=True if quiet() else None, leave=False, dynamic_ncols=True)
