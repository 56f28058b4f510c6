"""`tlt run` and `tlt serve` with an ``s3://`` store, against a real S3-protocol server (moto): the trainer
publishes each policy to S3 and the rollout service processes load it from there over gRPC-driven LoadPolicy;
`tlt export-drafter` / `tlt export-policy` take the trained versions out of S3.

The moto server, its dummy credentials and endpoint (``AWS_*`` in the environment, inherited by every
process) come from the ``s3`` fixture of test_store_s3.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import grpc
import pytest

from tests.integration.conftest import TINY_JOB
from tests.integration.test_store_s3 import BUCKET, s3  # noqa: F401 - s3: the moto server fixture
from tests.processes import step_records
from tests.reliability.service_process import spawn_service
from tlt.rpc.client import open_channel, wait_ready
from tlt.rpc.v1 import rollout_pb2, rollout_pb2_grpc
from tlt.store import ArtifactStore

pytestmark = pytest.mark.slow  # a two-step job across four service processes: 40-90 s on 2 cores

MISSING_BUCKET = "tlt-no-such-bucket"


def _keys(server: dict, prefix: str) -> set[str]:
    pages = server["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _tlt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlt.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.usefixtures("demo_drafter_dir")
def test_run_with_an_s3_store_publishes_there_and_workers_load_from_it(s3, tmp_path):  # noqa: F811
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{BUCKET}/{prefix}"
    out_dir = tmp_path / "run"
    settings = {**TINY_JOB, "steps": 2, "data.heldout": 4, "rollout.workers": 2, "store.uri": uri}
    done = _tlt("run", *[f"--set={k}={v}" for k, v in settings.items()], "--output-dir", str(out_dir),
                "--no-progress", "--no-report")
    assert done.returncode == 0, done.stderr
    assert "step 2: reward" in done.stdout
    assert f"store: {uri} (tlt export-policy / tlt export-drafter with this job's arguments" in done.stdout

    keys = _keys(s3, prefix)
    for kind, version in [("policy", 0), ("policy", 1), ("policy", 2), ("drafter", 0)]:
        assert f"{prefix}/{kind}/v{version:08d}/MANIFEST.json" in keys, sorted(keys)
    assert ArtifactStore(uri).latest("policy").version == 2
    assert not (out_dir / "store").exists()  # the S3 store is the only one

    records = step_records(out_dir)
    assert [r["step"] for r in records] == [1, 2]
    # each step's rollout ran on the policy the previous one published to S3, on both workers: a worker whose
    # LoadPolicy failed would be left out of the step (and named in failed_workers)
    assert [r["policy_version"] for r in records] == [0, 1]
    for record in records:
        assert sorted(w["worker"] for w in record["roles"]) == ["rollout-0", "rollout-1"]
        assert record["failed_workers"] == []
        assert record["sd"]["num_drafts"] > 0
    # the workers fetched their drafter from S3 at start: the cached copy is the bucket's version
    manifest = s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/drafter/v00000000/MANIFEST.json")["Body"].read()
    for worker in ("rollout-0", "rollout-1"):
        cached = out_dir / "cache" / worker / "drafter" / "MANIFEST.json"
        assert json.loads(cached.read_bytes()) == json.loads(manifest)

    # what the job trained comes out of S3 as deployable directories: the newest drafter and policy
    store = ArtifactStore(uri)
    for kind, version in (("drafter", store.latest("drafter").version), ("policy", 2)):
        out = tmp_path / f"exported-{kind}"
        done = _tlt(f"export-{kind}", "--set", f"store.uri={uri}", "--out", str(out), timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"exported {kind} v{version} ")
        assert (out / "model.safetensors").read_bytes() == store.read_bytes(kind, version, "model.safetensors")
    assert (tmp_path / "exported-policy" / "tokenizer.json").is_file()


@pytest.mark.parametrize("command", [["run", "--no-progress", "--no-report"], ["serve", "trainer", "--port", "0",
                                                                                "--metrics-port", "0"]],
                         ids=["run", "serve"])
def test_a_missing_bucket_is_one_clear_line_at_start(s3, tmp_path, command):  # noqa: F811
    uri = f"s3://{MISSING_BUCKET}/job"
    done = _tlt(*command, "--set", f"store.uri={uri}", "--set", f"output_dir={tmp_path}", timeout=120)
    assert done.returncode == 2, done.stderr
    [error] = done.stderr.strip().splitlines()
    assert error.startswith(f"tlt {command[0]}: error: S3 bucket '{MISSING_BUCKET}' does not exist"), error
    assert "create it" in error and "store.uri" in error and s3["endpoint"] in error
    assert not list((tmp_path / "services").glob("*.port"))  # no service was started
    assert MISSING_BUCKET not in [b["Name"] for b in s3["client"].list_buckets()["Buckets"]]


@pytest.fixture
def rollout_on_s3(s3, tmp_path, demo_model_dir) -> Iterator[tuple[rollout_pb2_grpc.RolloutStub, str, str]]:  # noqa: F811
    """``tlt serve rollout`` (SD off) on an S3 store holding the demo model as policy v0 and v1: (stub, uri,
    prefix)."""
    prefix = f"serve-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{BUCKET}/{prefix}"
    store = ArtifactStore(uri)
    for version in (0, 1):
        store.publish("policy", version, {"model.safetensors": demo_model_dir / "model.safetensors",
                                          "config.json": demo_model_dir / "config.json"})
    service = spawn_service("rollout", None, tmp_path, "rollout", "--set", "rollout.speculative.mode=off",
                            "--set", f"store.uri={uri}", "--set", f"output_dir={tmp_path}").wait_serving(120)
    try:
        with open_channel(service.address) as channel:
            wait_ready(channel, service.address)
            yield rollout_pb2_grpc.RolloutStub(channel), uri, prefix
    finally:
        service.stop()


def _load_policy_error(stub: rollout_pb2_grpc.RolloutStub, version: int) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadPolicy(rollout_pb2.LoadVersionRequest(version=version), timeout=60)
    return info.value


def test_store_errors_reach_the_client_with_a_clear_status(s3, rollout_on_s3):  # noqa: F811
    stub, uri, prefix = rollout_on_s3
    assert stub.LoadPolicy(rollout_pb2.LoadVersionRequest(version=-1), timeout=60).version == 1

    missing = _load_policy_error(stub, 5)
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert f"policy v5 is not in {uri}" in missing.details() and "[0, 1]" in missing.details()

    key = f"{prefix}/policy/v00000000/model.safetensors"
    body = bytearray(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # one flipped bit, same size
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    corrupt = _load_policy_error(stub, 0)
    assert corrupt.code() == grpc.StatusCode.DATA_LOSS
    assert "policy v0" in corrupt.details() and "model.safetensors" in corrupt.details(), corrupt.details()
    # the worker keeps serving the version it held
    assert stub.Progress(rollout_pb2.ProgressRequest(), timeout=30).policy_version == 1
