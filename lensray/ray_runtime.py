"""Start or join the Ray cluster every lensray job runs on (one place, so every job gets the same fix)."""

from __future__ import annotations

import os
import socket


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
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pinned = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_GCS_SERVER_PORT": str(port)}
    os.environ.update(pinned)
    try:
        ray.init(address="local")  # "local": start one here, whatever RAY_ADDRESS says
    finally:
        for key in pinned:
            os.environ.pop(key, None)
