"""ArtifactStore on S3: against a real S3-protocol server (moto) started by this module.

Credentials are dummies from the environment, the endpoint comes from AWS_ENDPOINT_URL (or explicit
storage_options), the bucket is made with boto3 (the store never creates buckets).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import save, save_file

from tests.processes import free_port
from tlt.store import ArtifactStore, FileEntry, StoreError, StoreIntegrityError, VersionNotFoundError
from tlt.store_s3 import PART_SIZE, storage_options

pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[dev]')")
boto3 = pytest.importorskip("boto3")

BUCKET = "tlt-test-store"
WEIGHTS = save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)})


def _moto_server() -> str:
    here = Path(sys.executable).parent / "moto_server"
    found = str(here) if here.exists() else shutil.which("moto_server")
    if not found:
        pytest.fail("moto_server is not installed next to this Python; install the dev extras: pip install -e '.[dev]'")
    return found


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port, dummy credentials in the environment, and one bucket."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([_moto_server(), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on {endpoint} (exit code {proc.poll()}); see {log.name}")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for var in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
                mp.delenv(var, raising=False)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_ENDPOINT_URL", endpoint)
            mp.setenv("AWS_CONFIG_FILE", os.devnull)
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)  # us-east-1: no LocationConstraint
            yield {"endpoint": endpoint, "client": client}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def store(s3):
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    return ArtifactStore(f"s3://{BUCKET}/{prefix}")  # endpoint from AWS_ENDPOINT_URL


def _keys(s3, prefix: str) -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _prefix(store: ArtifactStore) -> str:
    return store.root.partition("/")[2]


def test_publish_latest_fetch_load_round_trip(s3, store, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 3}')
    assert store.latest("policy") is None and store.versions("policy") == []
    m = store.publish("policy", 1, {"model.safetensors": WEIGHTS, "config.json": config, "tok/vocab.json": b"[]"},
                      {"step": 1})
    assert store.latest("policy") == m == store.manifest("policy", 1) and store.versions("policy") == [1]
    p = _prefix(store)
    assert _keys(s3, p) == [f"{p}/policy/LATEST", f"{p}/policy/v00000001/MANIFEST.json",
                            f"{p}/policy/v00000001/config.json", f"{p}/policy/v00000001/model.safetensors",
                            f"{p}/policy/v00000001/tok/vocab.json"]
    tensors = store.load_tensors("policy", 1)
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3)) and tensors["b"].dtype == torch.bfloat16
    assert store.read_bytes("policy", 1, "config.json") == config.read_bytes()
    dest = store.fetch("policy", 1, tmp_path / "rollout" / "v1")
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS and (dest / "tok" / "vocab.json").read_bytes() == b"[]"
    assert store.fetch("policy", 1, dest) == dest  # verified copy reused
    # LATEST only moves forward; a retry of identical content is idempotent
    store.publish("policy", 3, {"model.safetensors": WEIGHTS})
    store.publish("policy", 2, {"model.safetensors": WEIGHTS})
    assert store.latest("policy").version == 3 and store.versions("policy") == [1, 2, 3]
    assert store.publish("policy", 2, {"model.safetensors": WEIGHTS}) == store.manifest("policy", 2)
    # another store (another process) on the same prefix sees the same versions
    other = ArtifactStore(f"s3://{BUCKET}/{p}", storage_options={"endpoint_url": s3["endpoint"]})
    assert other.latest("policy").version == 3


def test_large_weights_multipart_publish_and_fetch(s3, store, tmp_path):
    """A 100+ MB safetensors file goes up as a multipart upload and comes back verified."""
    torch.manual_seed(0)
    tensors = {f"layers.{i}.mlp.weight": torch.randn(2048, 4096, dtype=torch.bfloat16) for i in range(7)}
    tensors["embed.weight"] = torch.randn(1000, 4096, dtype=torch.bfloat16)
    src = tmp_path / "model.safetensors"
    save_file(tensors, src)
    size = src.stat().st_size
    assert size > 100e6
    digest = xxhash.xxh3_128(src.read_bytes()).hexdigest()
    start = time.perf_counter()
    m = store.publish("policy", 7, {"model.safetensors": src, "config.json": b"{}"})
    assert m.files["model.safetensors"] == FileEntry("xxh3_128", digest, size)
    head = s3["client"].head_object(Bucket=BUCKET, Key=f"{_prefix(store)}/policy/v00000007/model.safetensors")
    parts = -(-size // PART_SIZE)
    assert head["ContentLength"] == size and head["ETag"].strip('"').endswith(f"-{parts}")  # multipart
    dest = store.fetch("policy", 7, tmp_path / "fetched")
    with open(dest / "model.safetensors", "rb") as f:
        assert hashlib.file_digest(f, xxhash.xxh3_128).hexdigest() == digest
    loaded = store.load_tensors("policy", 7)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert time.perf_counter() - start < 60


def test_version_without_manifest_is_invisible_and_collected(s3, store):
    store.publish("policy", 1, {"a.json": b"1"})
    p = _prefix(store)
    s3["client"].put_object(Bucket=BUCKET, Key=f"{p}/policy/v00000002/model.safetensors", Body=WEIGHTS)
    assert store.versions("policy") == [1] and store.latest("policy").version == 1
    with pytest.raises(VersionNotFoundError, match=r"policy v2 is not in s3://"):
        store.load_tensors("policy", 2)
    assert store.gc("policy", keep=5) == []  # young: maybe a publish in progress
    assert f"{p}/policy/v00000002/model.safetensors" in _keys(s3, p)
    assert store.gc("policy", keep=5, stale_after_s=0) == []
    assert not [k for k in _keys(s3, p) if "v00000002" in k]
    store.publish("policy", 2, {"a.json": b"2"})  # the number is usable again
    assert store.latest("policy").version == 2 and store.read_bytes("policy", 2, "a.json") == b"2"


def test_corrupted_object_is_detected(s3, store, tmp_path):
    m = store.publish("policy", 1, {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    key = f"{_prefix(store)}/policy/v00000001/model.safetensors"
    bad = WEIGHTS[:-1] + bytes([WEIGHTS[-1] ^ 1])
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=bad)
    with pytest.raises(StoreIntegrityError, match=r"does not match the manifest") as info:
        store.load_tensors("policy", 1)
    assert m.files["model.safetensors"].digest in str(info.value)
    assert f"xxh3_128 {xxhash.xxh3_128(bad).hexdigest()}" in str(info.value)
    with pytest.raises(StoreIntegrityError):
        store.read_bytes("policy", 1, "model.safetensors")
    with pytest.raises(StoreIntegrityError, match=r"policy v1/model\.safetensors"):
        store.fetch("policy", 1, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not list(tmp_path.iterdir())
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=WEIGHTS + b"x")  # longer
    with pytest.raises(StoreIntegrityError, match=f"{len(WEIGHTS) + 1} bytes"):
        store.load_tensors("policy", 1)
    s3["client"].delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(StoreIntegrityError, match=r"listed in the manifest but missing"):
        store.load_tensors("policy", 1)


def test_sha256_digest_and_old_sha256_manifests_on_s3(s3, store, tmp_path):
    """digest="sha256" publishes sha256 entries (12 MiB: several streamed blocks, hashed on the helper thread);
    a version written before manifests named their digest still loads and verifies."""
    weights = torch.randn(3 << 20)
    data = save({"w": weights})
    sha = ArtifactStore(store.uri, digest="sha256")
    m = sha.publish("policy", 1, {"model.safetensors": data})
    assert m.files["model.safetensors"] == FileEntry("sha256", hashlib.sha256(data).hexdigest(), len(data))
    assert torch.equal(store.load_tensors("policy", 1)["w"], weights)  # an xxh3 store verifies it by sha256
    p = _prefix(store)
    legacy = {"kind": "policy", "version": 2, "metadata": {}, "created": 1.0,
              "files": {"model.safetensors": {"sha256": hashlib.sha256(WEIGHTS).hexdigest(), "size": len(WEIGHTS)}}}
    client = s3["client"]
    client.put_object(Bucket=BUCKET, Key=f"{p}/policy/v00000002/model.safetensors", Body=WEIGHTS)
    client.put_object(Bucket=BUCKET, Key=f"{p}/policy/v00000002/MANIFEST.json", Body=json.dumps(legacy).encode())
    assert store.versions("policy") == [1, 2]
    assert store.manifest("policy", 2).files["model.safetensors"].algorithm == "sha256"
    assert (store.fetch("policy", 2, tmp_path / "v2") / "model.safetensors").read_bytes() == WEIGHTS
    assert store.publish("policy", 2, {"model.safetensors": WEIGHTS}) == store.manifest("policy", 2)  # a retry
    bad = WEIGHTS[:-1] + bytes([WEIGHTS[-1] ^ 1])
    client.put_object(Bucket=BUCKET, Key=f"{p}/policy/v00000002/model.safetensors", Body=bad)
    with pytest.raises(StoreIntegrityError, match=rf"sha256 {hashlib.sha256(bad).hexdigest()} .*does not match"):
        store.load_tensors("policy", 2)


def test_missing_bucket_is_a_clear_error_and_never_created(s3):
    missing = ArtifactStore("s3://tlt-no-such-bucket/run")
    for call in (lambda: missing.latest("policy"), lambda: missing.publish("policy", 1, {"a.json": b"1"}),
                 lambda: missing.versions("policy")):
        with pytest.raises(StoreError, match=r"bucket 'tlt-no-such-bucket' does not exist") as info:
            call()
        message = str(info.value)
        assert "create it" in message and "store.uri" in message and s3["endpoint"] in message
    assert "tlt-no-such-bucket" not in [b["Name"] for b in s3["client"].list_buckets()["Buckets"]]


def test_unreachable_endpoint_and_missing_credentials(s3, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(StoreError, match=rf"cannot reach the S3 endpoint {dead}.*AWS_ENDPOINT_URL"):
        ArtifactStore(f"s3://{BUCKET}/x", storage_options={"endpoint_url": dead, "config_kwargs": {
            "retries": {"max_attempts": 1}}}).latest("policy")  # extra options reach s3fs (fail fast here)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match=r"no usable S3 credentials.*AWS_ACCESS_KEY_ID"):
        ArtifactStore(f"s3://{BUCKET}/x").latest("policy")


def test_endpoint_resolution(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # the S3-specific variable wins
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3["endpoint"])
    store = ArtifactStore(f"s3://{BUCKET}/env-{uuid.uuid4().hex[:6]}")
    store.publish("drafter", 0, {"a.json": b"0"})
    assert store.latest("drafter").version == 0
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # explicit storage_options work without any variable
    explicit = ArtifactStore(store.uri, storage_options={"endpoint_url": s3["endpoint"]})
    assert explicit.read_bytes("drafter", 0, "a.json") == b"0"
    # what another process (a vLLM worker) gets to open the same store with
    assert ArtifactStore(explicit.uri, explicit.storage_options).read_bytes("drafter", 0, "a.json") == b"0"
    opts, endpoint = storage_options({"client_kwargs": {"endpoint_url": "http://minio:9000"}})
    assert endpoint == opts["endpoint_url"] == "http://minio:9000" and opts["use_listings_cache"] is False
    assert opts["client_kwargs"]["region_name"] == "us-east-1"


def test_gc_on_s3(s3, store):
    for v in range(1, 6):
        store.publish("policy", v, {"a.json": str(v).encode()})
    assert store.gc("policy", keep=2) == [1, 2, 3]
    assert store.versions("policy") == [4, 5] and store.latest("policy").version == 5
    p = _prefix(store)
    assert {k.split("/")[2] for k in _keys(s3, p)} == {"LATEST", "v00000004", "v00000005"}
    store.publish("policy", 6, {"a.json": b"6"})
    s3["client"].put_object(Bucket=BUCKET, Key=f"{p}/policy/LATEST", Body=json.dumps({"version": 4}).encode())
    assert store.gc("policy", keep=1) == [5]  # the pinned version (a rollback) survives
    assert store.versions("policy") == [4, 6] and store.latest("policy").version == 4
    # a publisher killed mid-upload leaves an invisible multipart upload: gc aborts it once stale
    key = f"{p}/policy/v00000007/model.safetensors"
    s3["client"].create_multipart_upload(Bucket=BUCKET, Key=key)
    assert s3["client"].list_multipart_uploads(Bucket=BUCKET, Prefix=p).get("Uploads")
    store.gc("policy", keep=1, stale_after_s=0)  # (moto dates every upload 2010, so no "young" case here)
    assert not s3["client"].list_multipart_uploads(Bucket=BUCKET, Prefix=p).get("Uploads")
    with pytest.raises(StoreError, match=r"keep must be an integer >= 1"):
        store.gc("policy", keep=0)


def test_dropped_download_resumes_and_still_verifies(s3, store, tmp_path, monkeypatch):
    import botocore.exceptions

    from tlt import store_s3

    data = save({"w": torch.randn(3 << 20)})  # 12 MiB: several READ_SIZE blocks
    store.publish("policy", 1, {"model.safetensors": data})
    real_fill, real_get, calls = store_s3.StreamReader._fill, store_s3.StreamReader._get, {"fill": 0, "get": 0}

    async def flaky_fill(self, view):
        calls["fill"] += 1
        if calls["fill"] == 2:  # the connection drops in the second block
            await real_fill(self, view[:1000])
            raise botocore.exceptions.ResponseStreamingError(error="connection reset")
        return await real_fill(self, view)

    def counting_get(self):
        calls["get"] += 1
        real_get(self)

    monkeypatch.setattr(store_s3.StreamReader, "_fill", flaky_fill)
    monkeypatch.setattr(store_s3.StreamReader, "_get", counting_get)
    dest = store.fetch("policy", 1, tmp_path / "v1")
    assert (dest / "model.safetensors").read_bytes() == data and calls["get"] == 2  # one resume


class _FakeS3:
    """Records the S3 calls of a MultipartWriter (no server needed)."""

    def __init__(self):
        self.calls = []

    def split_path(self, path):
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def call_s3(self, method, **kwargs):
        self.calls.append((method, len(kwargs["Body"]) if "Body" in kwargs else None))
        if method == "upload_part" and kwargs["PartNumber"] == 3 and kwargs["Key"] == "fail":
            raise ConnectionError("network down")
        return {"UploadId": "u1", "ETag": f'"{kwargs.get("PartNumber")}"', "ChecksumCRC32": "x", "ChecksumType": "y"}

    def invalidate_cache(self, path):
        pass


def test_multipart_writer_parts_growth_and_abort():
    from tlt.store_s3 import MultipartWriter

    fs = _FakeS3()
    with MultipartWriter(fs, "b/small", part_size=10) as w:
        w.write(b"123456789")
    assert fs.calls == [("put_object", 9)]
    fs.calls.clear()
    with MultipartWriter(fs, "b/big", part_size=10, concurrency=3) as w:
        for _ in range(1000 * 10 + 25):
            w.write(b"x")
    sizes = [n for method, n in fs.calls if method == "upload_part"]
    assert sizes == [10] * 1000 + [20, 5]  # parts double in size after 1000 of them
    assert [m for m, _ in fs.calls if m != "upload_part"] == ["create_multipart_upload", "complete_multipart_upload"]
    fs.calls.clear()
    with pytest.raises(ConnectionError), MultipartWriter(fs, "b/fail", part_size=10, concurrency=1) as w:
        w.write(b"x" * 60)
    methods = [m for m, _ in fs.calls]
    assert "complete_multipart_upload" not in methods and methods[-1] == "abort_multipart_upload"
