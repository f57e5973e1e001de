"""The object store going away while a `lensray train` or `lensray score` runs (issue 13's injected faults).

Each command runs as a CLI subprocess with a local Ray cluster of its own (no RAY_ADDRESS), so that its Ray
workers inherit this module's outage server (test_storage.Outage) as their S3 endpoint, not the session's.
A restart of a few seconds is waited out (the run or the scoring completes, as an uninterrupted one would);
an endpoint that stays down ends the command with one line naming the URL, exit 1, and leaves nothing
that looks complete: the run resumes, no candidates file exists.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from test_score import CORRUPT_ID, MISSING_ID, N, raw, trained  # noqa: F401 (fixtures used here)
from test_storage import Outage

from lensray import storage
from lensray.runs import complete_checkpoints, load_run
from lensray.sky.catalog import CATALOG_NAME

pytestmark = pytest.mark.slow

LASTRO = Path(__file__).resolve().parents[1] / "configs" / "lastro.yaml"
EPOCHS = 4
TRAIN_SETS = (
    f"train.epochs={EPOCHS}",
    "train.steps_per_epoch=4",
    "train.batch_size=16",
    "train.sanity=false",
    "model.lastro.dense=[32]",
    "model.lastro.filters=8",
)
RESTART_S = 4.0


@pytest.fixture()
def server(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Outage, str]]:
    """(an outage server, a fresh bucket on it), with this process pointed at it too."""
    import boto3

    outage = Outage()
    monkeypatch.setenv("AWS_ENDPOINT_URL", outage.endpoint)
    bucket = f"outage-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=outage.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield outage, f"s3://{bucket}"
    finally:
        outage.close()


def _env(endpoint: str) -> dict[str, str]:
    """The CLI's environment: this one, minus the session's Ray cluster, with the outage server's endpoint."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    env.pop("AWS_ENDPOINT_URL_S3", None)
    return {**env, "AWS_ENDPOINT_URL": endpoint}


def _error_line(stderr: str, command: str) -> str:
    """The one line a failed command printed (no traceback)."""
    assert "Traceback" not in stderr, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"lensray {command}: "), stderr
    return line


# --- train ----------------------------------------------------------------------------------------------


def _train(store: str, out: str, name: str, endpoint: str, *flags: str) -> subprocess.Popen:
    sets = [arg for key in TRAIN_SETS for arg in ("--set", key)]
    command = [sys.executable, "-m", "lensray", "train", "--config", str(LASTRO), *sets]
    command += ["--store", store, "--out", out, "--name", name, "--device", "cpu", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(endpoint))


def _after_checkpoint(process: subprocess.Popen, run_url: str, epoch: int) -> None:
    """Wait until the run has a complete checkpoint of ``epoch`` or later; the run must still be going."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and max(complete_checkpoints(run_url), default=0) < epoch:
        time.sleep(0.1)
    assert process.poll() is None, f"the run ended before the outage: {process.communicate()}"


def _assert_whole_run(run_url: str, epochs: int) -> None:
    history = json.loads(storage.read_bytes(storage.join(run_url, "history.json")))
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1)), history
    checkpoints = complete_checkpoints(run_url)
    assert max(checkpoints) == epochs, checkpoints
    for url in checkpoints.values():  # each one loads: weights, config, input contract
        assert load_run(url).history, url


def test_a_training_fails_in_one_line_when_its_endpoint_stays_down_and_resumes_through_a_restart(
    tiny_store: str, server: tuple[Outage, str]
) -> None:
    """Two runs of one training (each CLI start costs a Ray start): the first loses its endpoint for good
    after epoch 1; the --resume loses it for a few seconds after its first epoch, and finishes."""
    outage, bucket = server
    out = storage.join(bucket, "runs")
    run_url = storage.join(out, "outage")
    process = _train(tiny_store, out, "outage", outage.endpoint)
    _after_checkpoint(process, run_url, 1)
    outage.server.stop()
    started = time.monotonic()
    _, stderr = process.communicate(timeout=300)
    took = time.monotonic() - started
    outage.server.start()
    assert process.returncode == 1, stderr
    line = _error_line(stderr, "train")
    assert bucket in line and "unreachable" in line, line
    assert took >= sum(storage.RETRY_DELAYS_S), f"gave up after {took:.0f} s, before the retries were spent"
    # What the failed run left: complete checkpoints only, each of which loads.
    recorded = complete_checkpoints(run_url)
    assert recorded and max(recorded) < EPOCHS and all(load_run(url) for url in recorded.values())

    resumed = _train(tiny_store, out, "outage", outage.endpoint, "--resume")
    _after_checkpoint(resumed, run_url, max(recorded) + 1)
    outage.down_for(RESTART_S).join()
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resuming run outage after epoch {max(recorded)}" in stderr, stderr
    _assert_whole_run(run_url, EPOCHS)


# --- score ----------------------------------------------------------------------------------------------


class _OnRequest(logging.Handler):
    """Calls ``action`` (in a thread of its own) once the outage server has answered a request whose log
    line holds ``text``: moto's server logs each request through werkzeug's logger."""

    def __init__(self, text: str, action: Callable[[], object]) -> None:
        super().__init__(logging.INFO)
        self.text, self.action, self.fired = text, action, threading.Event()
        self.thread: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired.is_set() and self.text in record.getMessage():
            self.fired.set()
            self.thread = threading.Thread(target=self.action, daemon=True)
            self.thread.start()


@pytest.fixture()
def on_request() -> Iterator[Callable[[str, Callable[[], object]], _OnRequest]]:
    logger = logging.getLogger("werkzeug")
    level, handlers = logger.level, []

    def install(text: str, action: Callable[[], object]) -> _OnRequest:
        handler = _OnRequest(text, action)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        handlers.append(handler)
        return handler

    yield install
    for handler in handlers:
        logger.removeHandler(handler)
        if handler.thread is not None:
            handler.thread.join()
    logger.setLevel(level)


def _upload(folder: str, remote: str) -> None:
    for path in Path(folder).rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(remote, str(path.relative_to(folder))), path.read_bytes())


def _score(checkpoint: str, remote: str, out: str, endpoint: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lensray", "score", "--run", checkpoint, "--images", remote]
    command += ["--catalog", storage.join(remote, CATALOG_NAME), "--out", out, "--device", "cpu", "--gallery", "0"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env(endpoint))


def test_a_scoring_rides_out_endpoint_restarts_while_reading_and_writing(
    raw: str,  # noqa: F811
    trained: tuple[str, str],  # noqa: F811
    server: tuple[Outage, str],
    on_request: Callable[[str, Callable[[], object]], _OnRequest],
) -> None:
    outage, bucket = server
    remote, out = storage.join(bucket, "raw"), storage.join(bucket, "out", "candidates.parquet")
    _upload(raw, remote)
    reading = on_request(f"GET /{bucket[5:]}/raw/EUC_VIS", lambda: outage.down_for(RESTART_S).join())
    writing = on_request(f"PUT /{bucket[5:]}/out/candidates.parquet", lambda: outage.down_for(RESTART_S).join())
    done = _score(trained[0], remote, out, outage.endpoint)
    assert done.returncode == 0, done.stderr
    assert reading.fired.is_set() and writing.fired.is_set(), "both outages must have happened during the job"
    candidates = pd.read_parquet(io.BytesIO(storage.read_bytes(out)))
    rejects = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(bucket, "out", "candidates_rejects.csv"))))
    assert len(candidates) == N - 2 and sorted(rejects["id"]) == [CORRUPT_ID, MISSING_ID], "no outage reject"
    summary = json.loads(storage.read_bytes(storage.join(bucket, "out", "candidates_summary.json")))
    assert summary, "the summary, written before the candidates, is there"


def test_a_scoring_whose_endpoint_stays_down_fails_in_one_line_and_writes_no_candidates(
    raw: str,  # noqa: F811
    trained: tuple[str, str],  # noqa: F811
    server: tuple[Outage, str],
    on_request: Callable[[str, Callable[[], object]], _OnRequest],
) -> None:
    outage, bucket = server
    remote, out = storage.join(bucket, "raw"), storage.join(bucket, "out", "candidates.parquet")
    _upload(raw, remote)
    reading = on_request(f"GET /{bucket[5:]}/raw/EUC_VIS", outage.server.stop)
    done = _score(trained[0], remote, out, outage.endpoint)
    assert reading.fired.is_set()
    reading.thread.join()
    outage.server.start()
    assert done.returncode == 1, done.stderr
    line = _error_line(done.stderr, "score")
    assert bucket in line and "unreachable" in line, line
    for name in ("candidates.parquet", "candidates_rejects.csv", "candidates_summary.json"):
        assert not storage.exists(storage.join(bucket, "out", name)), name
