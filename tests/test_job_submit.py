"""`ray job submit` against a real Ray head, as the README's Kubernetes path does it (there through a
port-forward to the KubeRay head service): the checkout as the working dir, the demo Tune search as
the entrypoint, then the job's status, logs and results.

The head runs in its own process group with its own temp dir and ports, so it neither sees nor
disturbs the suite's in-process Ray (``conftest.ray_cluster``) or any other Ray on the machine. It is
stopped by signalling that process group only (never ``ray stop``, which stops every Ray on the host).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RUNTIME_ENV = REPO / "k8s" / "job-runtime-env.yaml"
JOB_TIMEOUT_S = 900
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    address: str  # the dashboard's HTTP address, what `ray job submit --address` takes
    env: dict[str, str]  # the environment to run `ray job ...` with (it carries the auth token's path)
    token: str

    def get(self, route: str) -> Any:
        """JSON from the dashboard's REST API (what the `ray job` CLI talks to)."""
        request = urllib.request.Request(f"{self.address}{route}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A `ray` CLI command against this head, run from the repository root."""
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )


def _wait_for_dashboard(head: RayHead, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {process.returncode}")
        try:
            head.get("/api/version")
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {head.address} did not answer within {timeout:.0f} s")


def _group_alive(group: int) -> bool:
    """Whether a process of ``group`` is still running (zombies waiting for a reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 reaches zombies too, but it is the portable check
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == group and state != "Z":
                return True
    return False


def _stop_process_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM `ray start --block`, which then stops the Ray processes it started; SIGKILL what is left
    of its process group (only this head's processes) after ``timeout``."""
    group = process.pid  # start_new_session: the group id is the leader's pid
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(group) and time.monotonic() < deadline:
        process.poll()  # reap the leader
        time.sleep(0.5)
    if _group_alive(group):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # A short path: Ray's Unix sockets live under the temp dir and are limited to 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="lrjob-", dir="/tmp"))
    dashboard_port = _free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # The job's shell finds `lensray` (and `python`) here, as it finds the image's in a cluster pod.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    # Token authentication, as on the KubeRay cluster (authOptions.mode: token), with a token of its own.
    token = secrets.token_hex(32)
    (temp_dir / "auth_token").write_text(token)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp_dir / "auth_token")})
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # no serving to drain: stop at once on SIGTERM
    # Ray's own processes find their cluster by "auto" (e.g. Train's placement-group cleaner, through the
    # state API), which fails when another Ray runs on the host (the suite's in-process one): name it.
    # Measured without it: the first trial's placement group leaked and the second trial never started.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
        "--min-worker-port": 0,
        "--max-worker-port": 0,  # 0: the OS picks free ports
    }
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--num-gpus=0",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=300000000",
        "--disable-usage-stats",
        *(f"{flag}={value}" for flag, value in ports.items()),
    ]
    log = open(temp_dir / "ray-start.log", "wb")
    process = subprocess.Popen(
        command, cwd=temp_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = RayHead(address=f"http://127.0.0.1:{dashboard_port}", env=env, token=token)
    try:
        try:
            _wait_for_dashboard(head, process)
        except (RuntimeError, TimeoutError):
            log.flush()
            print((temp_dir / "ray-start.log").read_text()[-4000:], file=sys.stderr)
            raise
        yield head
    finally:
        _stop_process_group(process)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job(head: RayHead, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = head.get(f"/api/jobs/{job_id}")
        if info["status"] in TERMINAL:
            return info
        time.sleep(3)
    raise TimeoutError(f"job {job_id} did not finish within {JOB_TIMEOUT_S} s")


@pytest.mark.slow
def test_demo_tune_search_via_ray_job_submit(ray_head: RayHead, tiny_store: str, tmp_path: Path) -> None:
    experiments = tmp_path / "experiments"
    job_id = f"lensray-test-{uuid.uuid4().hex[:8]}"
    submitted = ray_head.ray(
        "job",
        "submit",
        "--address",
        ray_head.address,
        "--submission-id",
        job_id,
        "--no-wait",
        "--working-dir",
        ".",
        "--runtime-env",
        str(RUNTIME_ENV.relative_to(REPO)),
        "--",
        "lensray",
        "tune",
        "--config",
        "lensray/resources/demo_search.yaml",
        "--store",
        tiny_store,
        "--storage",
        str(experiments),
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    info = _wait_for_job(ray_head, job_id)
    status = ray_head.ray("job", "status", "--address", ray_head.address, job_id).stdout
    logs = ray_head.ray("job", "logs", "--address", ray_head.address, job_id).stdout
    assert info["status"] == "SUCCEEDED", (
        f"job {job_id}: {status}\n{info.get('message')}\nlogs end with:\n{logs[-6000:]}"
    )
    assert "succeeded" in status.lower(), status  # `ray job status` says so too
    # The checkout was uploaded (as a gcs:// package) and the excludes came from the runtime-env file.
    runtime_env = info["runtime_env"]
    assert runtime_env["working_dir"].startswith("gcs://"), runtime_env
    assert ".venv/" in runtime_env["excludes"], runtime_env

    best_files = list(experiments.glob("*/best_config.yaml"))
    assert len(best_files) == 1, f"expected one search with a best config under {experiments}"
    best_yaml = best_files[0].read_text()
    best = yaml.safe_load(best_yaml)
    search = yaml.safe_load((REPO / "lensray" / "resources" / "demo_search.yaml").read_text())
    grid = search["space"]["optim.lr"]["grid"]
    assert best["data"]["store"] == tiny_store
    assert best["optim"]["lr"] in grid
    assert best_yaml.strip() in logs, "the job's logs should print the best trial's config YAML"
    assert len(list(best_files[0].parent.glob("trial_*"))) == len(grid) * search["search"]["num_samples"]

    # What the README's notebook step does with the results: the best trial's model, no cluster needed.
    import lensray
    from lensray.ingest.store import LensStore

    run = lensray.load_best(str(best_files[0].parent))
    assert run.config.optim.lr == best["optim"]["lr"]
    images = np.zeros((2, *LensStore.open(tiny_store).sample_shape), np.float32)
    assert run.predict(images).shape == (2,)
