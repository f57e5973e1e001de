"""Credentials never leak: AWS keys set for a run appear in no output, log, saved config, run folder or error.

The keys are unique fake values (moto's server accepts any), so a match anywhere can only be a leak: in the
commands' stdout and stderr (a failing one and a ``-v`` traceback included), every object the commands wrote
to the bucket, every file in the working folder and every file of the Ray session (logs included).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lensray import storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ray_temp() -> Iterator[Path]:
    # Short: Ray's Unix sockets live under it and their paths must stay under ~107 characters.
    folder = Path(tempfile.mkdtemp(prefix="lrsec", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _secrets() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": f"AKIA{uuid.uuid4().hex[:16].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"fake/{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}",
    }


def _leaks(data: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in data]


def _files_with_secrets(root: Path, secrets: dict[str, str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and not path.is_socket():
            try:
                data = path.read_bytes()
            except OSError:
                continue  # a socket or a file removed while we looked
            found += [f"{path}: {name}" for name in _leaks(data, secrets)]
    return found


def _objects_with_secrets(bucket: str, secrets: dict[str, str]) -> tuple[int, list[str]]:
    fs, root = storage.filesystem(bucket)
    keys = fs.find(root)
    found = [f"s3://{key}: {name}" for key in keys for name in _leaks(fs.cat_file(key), secrets)]
    return len(keys), found


@pytest.mark.slow
def test_fake_aws_keys_appear_nowhere(tiny_store: str, s3_bucket: str, tmp_path: Path, ray_temp: Path) -> None:
    secrets = _secrets()
    fs, root = storage.filesystem(s3_bucket)
    fs.put(tiny_store, f"{root}/tiny.zarr", recursive=True)
    store, runs = storage.join(s3_bucket, "tiny.zarr"), storage.join(s3_bucket, "runs")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray session of its own, in ray_temp
    env.update(secrets, RAY_TMPDIR=str(ray_temp))
    work = tmp_path / "work"
    work.mkdir()
    knobs = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--workers", "1", "--device", "cpu"]
    knobs += ["--set", "train.sanity=false", "--set", "model.lastro.filters=4", "--set", "model.lastro.dense=[8]"]
    commands = {  # name: (argv, expected exit status)
        "train": (["train", "--store", store, "--out", runs, "--name", "secret", *knobs], 0),
        "evaluate": (["evaluate", "--run", f"{runs}/secret", "--store", store, "--split", "val"], 0),
        "a failing evaluate": (["evaluate", "--run", f"{runs}/missing", "--store", store], 1),
        "a traceback under -v": (["-v", "train", "--store", f"{s3_bucket}/missing.zarr", "--out", runs], 1),
        "a missing bucket": (["store", "info", "s3://no-such-bucket-for-secrets/store.zarr"], 1),
    }
    output, stderr = [], {}
    for name, (argv, status) in commands.items():
        if argv[0] == "evaluate":
            argv = [*argv, "--out", storage.join(s3_bucket, "eval"), "--device", "cpu"]
        done = subprocess.run(
            [sys.executable, "-m", "lensray", *argv], capture_output=True, cwd=work, env=env, timeout=600
        )
        assert done.returncode == status, (name, done.stderr.decode(errors="replace")[-3000:])
        output += [f"{name} output: {leak}" for leak in _leaks(done.stdout + done.stderr, secrets)]
        stderr[name] = done.stderr
    assert b"Traceback" in stderr["a traceback under -v"] and b"no-such-bucket" in stderr["a missing bucket"]

    n_objects, in_bucket = _objects_with_secrets(s3_bucket, secrets)
    assert n_objects > 20  # the run folder (config, history, checkpoints, TensorBoard) and the report
    assert list(ray_temp.rglob("*.log")) or list(ray_temp.rglob("*.out")), "the Ray session kept its logs there"
    leaks = output + in_bucket + _files_with_secrets(work, secrets) + _files_with_secrets(ray_temp, secrets)
    assert leaks == []
