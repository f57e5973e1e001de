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

    ray.init(num_cpus=2, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
