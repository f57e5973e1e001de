"""Shared real parts for the suite: moto's S3 server on loopback and one local Ray cluster."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

# Before Ray starts: shorter controller polling keeps Train tests quick.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


# The longest test files first (measured with --durations): `make test`'s --dist loadscope hands files to the
# workers in collection order, and a long file left for last keeps one worker busy while the other idles.
LONGEST_FIRST = (
    "test_trainer",
    "test_tuning",
    "test_install",
    "test_cli",
    "test_ensemble",
    "test_outage",
    "test_score",
    "test_loop",
    "test_job_submit",
    "test_export",
    "test_recipe",
    "test_survey_e2e",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's own order is kept


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a loopback port; sets the AWS_* environment so lensray reaches it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the moto server, as an ``s3://`` URL (created with boto3: s3fs mkdir fails on moto)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[None]:
    """One local Ray cluster for the whole session (started after the S3 env is set, so workers see it)."""
    import ray

    # A known address in every worker's RAY_ADDRESS: Ray Train's placement-group cleaner (which frees
    # the CPUs of a trial that Tune stopped) finds its cluster through it, and cannot guess which one
    # is its own when several Ray instances run on the machine.
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update({"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_GCS_SERVER_PORT": str(port)})
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


TINY_SIZE = 32


def separable_images(labels, rng):
    """Noise, plus a bright ring (an 'arc') around the centre for lenses: trivially separable."""
    import numpy as np

    yy, xx = np.mgrid[:TINY_SIZE, :TINY_SIZE] - (TINY_SIZE - 1) / 2
    ring = np.exp(-((np.hypot(yy, xx) - 8.0) ** 2) / 4.0).astype(np.float32)
    images = rng.normal(0, 1, (len(labels), 2, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    images[labels == 1] += 3 * ring
    return images


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished 96-sample store (64 train, 32 val) of 2x32x32 separable images, shared by the session."""
    import numpy as np

    from lensray.ingest.store import SPLITS, create_store, finalize_store, shard_ranges, write_shard

    url = str(tmp_path_factory.mktemp("tiny") / "tiny.zarr")
    n = 96
    labels = np.tile([0, 1], n // 2).astype(np.int8)
    split = np.full(n, SPLITS["train"], np.int8)
    split[64:] = SPLITS["val"]
    ids = np.arange(500000, 500000 + n)
    meta = {
        "preprocess": {"synthetic": True},
        "label_rule": "paper",
        "bands": ["VIS", "H"],
        "source": {"images": "synthetic"},
    }
    create_store(
        url, ids=ids, labels=labels, split=split, channels=2, size=TINY_SIZE, dtype="float32", shard_size=32, meta=meta
    )
    images = separable_images(labels, np.random.default_rng(0))
    for index, (lo, hi) in enumerate(shard_ranges(n, 32)):
        write_shard(url, index, images[lo:hi], np.ones(hi - lo, bool), [])
    finalize_store(url)
    return url


TINY_SEARCH_EPOCHS = 4


@pytest.fixture(scope="session")
def tiny_search_tree(tiny_store: str):
    """A tune file's mapping for two trials on ``tiny_store``, the good learning rate first, one at a
    time: ASHA then has a rung result to compare the second (hopeless) trial with at epoch 2."""
    from pathlib import Path

    base = str(Path(__file__).resolve().parents[1] / "configs" / "lastro.yaml")

    def build(storage_url: str, name: str, **train: object) -> dict:
        settings = {
            "epochs": TINY_SEARCH_EPOCHS,
            "steps_per_epoch": 2,
            "batch_size": 16,
            "sanity": False,
            "early_stopping_patience": None,
            **train,
        }
        return {
            "base": base,
            "run": {
                "data": {"store": tiny_store},
                "model": {"lastro": {"filters": 8, "dense": [32]}},
                "train": settings,
            },
            "space": {"optim.lr": {"grid": [3.0e-3, 1.0e-7]}},
            "search": {"name": name, "storage": storage_url, "max_concurrent_trials": 1, "grace_period": 2},
        }

    return build


@pytest.fixture(scope="session")
def tune_search(tiny_search_tree, s3_server: str, ray_cluster: None):
    """One finished two-trial ASHA search on moto's S3 (lensray.train.tune.SearchOutcome), shared by the session."""
    import boto3

    from lensray.train.tune import run_tune, tune_spec_from_dict

    bucket = f"tune-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    outcome = run_tune(tune_spec_from_dict(tiny_search_tree(f"s3://{bucket}/experiments", "asha"), "tiny search"))
    print(outcome)
    return outcome
