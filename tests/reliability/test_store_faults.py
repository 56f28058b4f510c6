"""Object-store faults on S3, injected by a proxy process (``tests/s3_fault_proxy.py``) in front of a real moto
server: chosen requests get 503 SlowDown or 500, a reset connection, a lost answer, silence past the
client's read timeout, a response body cut short or one with a flipped byte.

Shown: transient faults on every kind of request the store makes are retried with backoff (the proxy saw the
failed tries, the store logged its retries) and the data comes back byte-exact; persistent ones end in a
StoreError naming the operation, the object and the cause, after :data:`store_s3.RETRY_ATTEMPTS` tries or
the time budget, and leave no new version; permanent errors (403, 404, 400) are not retried; corrupted bytes
are never returned as valid; a multipart upload left behind by a killed publisher is invisible and gc aborts
it. The backoff constants are shrunk here so the module runs in well under a minute.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from tests.integration.test_store_s3 import BUCKET, s3  # noqa: F401 - s3: the moto server fixture
from tests.s3_fault_proxy import FaultProxy
from tlt import store_s3
from tlt.store import ArtifactStore, StoreError, StoreIntegrityError, VersionNotFoundError

READ_TIMEOUT_S = 2.0  # the client's read timeout: a stall longer than this is a failed try
PART = 5 << 20  # S3's smallest part size: the 11.6 MB model goes up as a multipart upload of 3 parts
TENSOR = torch.randn(2_900_000, generator=torch.Generator().manual_seed(0))
MODEL = save({"w": TENSOR})
CONFIG = b'{"hidden_size": 3}'
SLOWDOWN = {"action": "error", "status": 503, "code": "SlowDown"}
INTERNAL = {"action": "error", "status": 500, "code": "InternalError"}

# A publisher run as its own process (killed mid-upload by a test): store URI, endpoint, model file.
PUBLISHER = f"""
import sys
from pathlib import Path
from tlt import store_s3
from tlt.store import ArtifactStore
store_s3.PART_SIZE = {PART}
uri, endpoint, model = sys.argv[1:]
store = ArtifactStore(uri, storage_options={{"endpoint_url": endpoint}})
store.publish("policy", 2, {{"model.safetensors": Path(model), "config.json": b"{{}}"}})
"""


@pytest.fixture(scope="module")
def proxy(s3):  # noqa: F811 - the imported fixture
    fault_proxy = FaultProxy(s3["endpoint"])
    yield fault_proxy
    fault_proxy.stop()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch, proxy, caplog):
    """Milliseconds of backoff instead of seconds, small parts, no rules left over, retries logged."""
    monkeypatch.setattr(store_s3, "RETRY_BASE_S", 0.02)
    monkeypatch.setattr(store_s3, "RETRY_MAX_DELAY_S", 0.1)
    monkeypatch.setattr(store_s3, "PART_SIZE", PART)
    caplog.set_level(logging.WARNING, logger=store_s3.__name__)
    proxy.clear()


@pytest.fixture
def store(proxy):
    """A store on a fresh prefix that reaches S3 through the proxy."""
    return ArtifactStore(f"s3://{BUCKET}/faults-{uuid.uuid4().hex[:8]}", storage_options={
        "endpoint_url": proxy.endpoint, "config_kwargs": {"read_timeout": READ_TIMEOUT_S}})


def _requests(store: ArtifactStore, version: int) -> dict[str, str]:
    """A pattern for each kind of request a publish, load, fetch and gc of ``version`` make, by S3 operation."""
    prefix = store.root.partition("/")[2]
    kind, obj = f"/{BUCKET}/{prefix}/policy", f"/{BUCKET}/{prefix}/policy/v{version:08d}"
    return {
        "HeadBucket": rf"^HEAD /{BUCKET}$",
        "HeadObject": rf"^HEAD {obj}/MANIFEST\.json$",
        "PutObject": rf"^PUT {obj}/config\.json$",
        "CreateMultipartUpload": rf"^POST {obj}/model\.safetensors\?uploads",
        "UploadPart": rf"^PUT {obj}/model\.safetensors\?.*partNumber=2\b",
        "CompleteMultipartUpload": rf"^POST {obj}/model\.safetensors\?uploadId=",
        "PutObject manifest": rf"^PUT {obj}/MANIFEST\.json$",
        "PutObject LATEST": rf"^PUT {kind}/LATEST$",
        "GetObject manifest": rf"^GET {obj}/MANIFEST\.json$",
        "GetObject": rf"^GET {obj}/model\.safetensors$",
        "ListObjectsV2": rf"^GET /{BUCKET}\?list-type=2&prefix={prefix}%2Fpolicy%2F&",
        "DeleteObject": rf"^DELETE {obj}/MANIFEST\.json$",
        "DeleteObjects": rf"^POST /{BUCKET}\?delete",
        "ListMultipartUploads": rf"^GET /{BUCKET}\?uploads",
    }


def _key(store: ArtifactStore, version: int, name: str) -> str:
    """The URL of file ``name`` of ``version``, as errors and logs name it."""
    return f"s3://{store.root}/policy/v{version:08d}/{name}"


def _retries_logged(caplog, operation: str, key: str = "") -> int:
    """How many retries the store logged for ``operation`` (on ``key``)."""
    return sum(1 for r in caplog.records if r.getMessage().startswith(f"S3 {operation} {key}"))


def _uploads(server: dict, store: ArtifactStore) -> list[dict]:
    """Multipart uploads in progress under the store's prefix (asked of the moto ``server`` directly)."""
    prefix = store.root.partition("/")[2] + "/"
    return server["client"].list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])


def _assert_loads(store: ArtifactStore, version: int, tmp_path: Path) -> None:
    """``version`` loads and fetches byte-exact."""
    assert torch.equal(store.load_tensors("policy", version)["w"], TENSOR)
    dest = store.fetch("policy", version, tmp_path / f"fetched-{uuid.uuid4().hex[:6]}")
    assert (dest / "model.safetensors").read_bytes() == MODEL and (dest / "config.json").read_bytes() == CONFIG


@pytest.mark.parametrize("fault", [SLOWDOWN, INTERNAL, {"action": "reset"}, {"action": "drop"},
                                   {"action": "stall"}], ids=["503-SlowDown", "500", "reset", "lost-answer", "stall"])
def test_transient_faults_on_every_request_are_retried(proxy, store, s3, tmp_path, caplog, fault):  # noqa: F811
    """Every kind of request fails (its first tries), the store retries each, and all data arrives byte-exact."""
    patterns = _requests(store, 1)
    if fault["action"] == "stall":  # each costs a read timeout: stall an upload, a HEAD and a download
        patterns = {op: patterns[op] for op in ("UploadPart", "HeadObject", "GetObject")}
    # the HTTP client re-sends an idempotent request once by itself when its connection breaks: 3 breaks
    # make sure the store's own retries are needed too
    times = {"stall": 1, "reset": 3, "drop": 3}.get(fault["action"], 2)
    for pattern in patterns.values():
        proxy.add(pattern, times=times, **fault)
    store.publish("policy", 1, {"model.safetensors": MODEL, "config.json": CONFIG})
    assert store.latest("policy").version == 1
    _assert_loads(store, 1, tmp_path)
    store.publish("policy", 2, {"config.json": CONFIG})
    assert store.gc("policy", keep=1) == [1] and store.versions("policy") == [2]
    for operation, pattern in patterns.items():
        faults = [e["fault"] for e in proxy.requests(pattern)]
        assert faults[:times + 1] == [fault["action"]] * times + [None], (operation, faults)
        assert _retries_logged(caplog, operation.split()[0]) >= 1, operation
    assert not _uploads(s3, store)  # uploads orphaned by lost answers were aborted by gc


PERSISTENT = {  # what fails for good -> (S3 operation, fault, the cause the error names, tries)
    "part-503": ("UploadPart", SLOWDOWN, r"HTTP 503 SlowDown: injected", store_s3.RETRY_ATTEMPTS),
    "complete-500": ("CompleteMultipartUpload", INTERNAL, r"HTTP 500 InternalError", store_s3.RETRY_ATTEMPTS),
    "manifest-reset": ("PutObject manifest", {"action": "reset"}, r"Connection reset by peer", store_s3.RETRY_ATTEMPTS),
    # the manifest lands every time but no answer comes back: the failed publish takes it down again
    "manifest-lost-answer": ("PutObject manifest", {"action": "drop"}, r"\S", store_s3.RETRY_ATTEMPTS),
    # a stall costs a read timeout per try: the time budget (READ_TIMEOUT_S + 1 s here) stops it after 2 tries
    "small-put-stall": ("PutObject", {"action": "stall"}, r"ReadTimeoutError", 2),
}


@pytest.mark.parametrize("case", PERSISTENT.values(), ids=PERSISTENT.keys())
def test_persistent_faults_fail_clearly_and_publish_nothing(proxy, store, s3, tmp_path, caplog, monkeypatch,  # noqa: F811
                                                           case):
    operation, fault, cause, tries = case
    monkeypatch.setattr(store_s3, "RETRY_BUDGET_S", READ_TIMEOUT_S + 1.0)
    store.publish("policy", 1, {"config.json": CONFIG})
    name = {"PutObject manifest": "MANIFEST.json", "PutObject": "config.json"}.get(operation, "model.safetensors")
    key = _key(store, 2, name)
    proxy.add(_requests(store, 2)[operation], times=None, **fault)
    with pytest.raises(StoreError) as info:
        store.publish("policy", 2, {"model.safetensors": MODEL, "config.json": CONFIG})
    op = operation.split()[0]
    message = str(info.value)
    assert re.search(rf"S3 {op} {re.escape(key)} failed {tries} times in [\d.]+ s .*the last: .*{cause}", message)
    assert store.uri in message
    assert _retries_logged(caplog, op, key) == tries - 1
    assert len(proxy.requests(_requests(store, 2)[operation])) >= tries
    proxy.clear()
    # the failed publish is not a version: LATEST, the listing and loads all still say v1
    assert store.latest("policy").version == 1 and store.versions("policy") == [1]
    with pytest.raises(VersionNotFoundError):
        store.load_tensors("policy", 2)
    with pytest.raises(VersionNotFoundError):
        store.fetch("policy", 2, tmp_path / "v2")
    assert not (tmp_path / "v2").exists() and not _uploads(s3, store)  # the multipart upload was aborted
    store.publish("policy", 2, {"model.safetensors": MODEL, "config.json": CONFIG})  # the caller's retry works
    assert store.latest("policy").version == 2
    _assert_loads(store, 2, tmp_path)


def test_failure_after_the_commit_leaves_the_version_whole_and_a_retry_moves_latest(proxy, store, caplog, tmp_path):
    """The manifest is the commit: if only the LATEST write fails, the version is complete and verifies, LATEST
    still names the previous one until the publish is retried (or a newer one is published)."""
    store.publish("policy", 1, {"config.json": CONFIG})
    proxy.add(_requests(store, 2)["PutObject LATEST"], times=None, **SLOWDOWN)
    with pytest.raises(StoreError, match=rf"S3 PutObject s3://{store.root}/policy/LATEST failed 6 times"):
        store.publish("policy", 2, {"model.safetensors": MODEL, "config.json": CONFIG})
    proxy.clear()
    assert store.latest("policy").version == 1
    _assert_loads(store, 2, tmp_path)
    store.publish("policy", 2, {"model.safetensors": MODEL, "config.json": CONFIG})  # the caller's retry
    assert store.latest("policy").version == 2
    store.publish("policy", 3, {"config.json": CONFIG})
    assert store.latest("policy").version == 3


@pytest.mark.parametrize(("operation", "fault", "message"), [
    ("PutObject", {"status": 403, "code": "AccessDenied"}, r"refused access"),
    ("UploadPart", {"status": 400, "code": "InvalidArgument"}, r"publish policy v1 to s3://.* failed"),
    ("HeadBucket", {"status": 404, "code": "NoSuchBucket"}, rf"bucket '{BUCKET}' does not exist"),
], ids=["403-AccessDenied", "400-InvalidArgument", "404-NoSuchBucket"])
def test_permanent_errors_are_not_retried(proxy, store, s3, caplog, operation, fault, message):  # noqa: F811
    pattern = _requests(store, 1)[operation]
    proxy.add(pattern, "error", times=None, **fault)
    start = time.monotonic()
    with pytest.raises(StoreError, match=message):
        store.publish("policy", 1, {"model.safetensors": MODEL, "config.json": CONFIG})
    assert len(proxy.requests(pattern)) == 1 and not _retries_logged(caplog, operation)
    assert time.monotonic() - start < 5
    proxy.clear()
    assert store.latest("policy") is None and not _uploads(s3, store)


def test_downloads_that_break_off_resume_where_they_stopped(proxy, store, tmp_path, caplog):
    store.publish("policy", 1, {"model.safetensors": MODEL, "config.json": CONFIG})
    requests = _requests(store, 1)
    model = requests["GetObject"]
    # the first block (READ_SIZE, 8 MiB) arrives whole, the second breaks off twice, then stalls
    proxy.add(model, "truncate", times=2, fraction=0.8)
    proxy.add(model, "stall", times=1, fraction=0.5)
    assert torch.equal(store.load_tensors("policy", 1)["w"], TENSOR)
    seen = proxy.requests(model)
    resume = f"bytes={store_s3.READ_SIZE}-"
    assert [(e["fault"], e["range"]) for e in seen] == [
        ("truncate", None), ("truncate", resume), ("stall", resume), (None, resume)]
    assert _retries_logged(caplog, "GetObject", _key(store, 1, "model.safetensors")) == 3
    proxy.add(requests["GetObject manifest"], "truncate", times=1, fraction=0.5)  # a small object: s3fs re-reads it
    assert store.latest("policy").version == 1
    assert [e["fault"] for e in proxy.requests(requests["GetObject manifest"])][-2:] == ["truncate", None]
    # for good: a clear error naming the object, and nothing at the destination
    proxy.add(model, "truncate", times=None, fraction=0.3)
    with pytest.raises(StoreError, match=rf"S3 GetObject {re.escape(_key(store, 1, 'model.safetensors'))} failed "
                                         r"6 times .*the download broke off after byte 0 of \d+ \(ClientPayloadError"):
        store.fetch("policy", 1, tmp_path / "v1")
    assert not list(tmp_path.iterdir())
    proxy.clear()
    proxy.add(model, times=None, **SLOWDOWN)
    with pytest.raises(StoreError, match=r"S3 GetObject .*model\.safetensors failed 6 times .*HTTP 503 SlowDown"):
        store.load_tensors("policy", 1)
    proxy.clear()
    _assert_loads(store, 1, tmp_path)


def test_corrupted_bytes_are_never_returned_as_valid(proxy, store, s3, tmp_path):  # noqa: F811
    store.publish("policy", 1, {"model.safetensors": MODEL, "config.json": CONFIG})
    requests = _requests(store, 1)
    # a flipped byte in the multipart model (no whole-object checksum at S3): the manifest's checksum catches it
    proxy.add(requests["GetObject"], "corrupt", times=None, fraction=0.7)
    with pytest.raises(StoreIntegrityError, match=r"policy v1/model\.safetensors: xxh3_128 .* does not match"):
        store.load_tensors("policy", 1)
    with pytest.raises(StoreIntegrityError):
        store.fetch("policy", 1, tmp_path / "v1")
    assert not list(tmp_path.iterdir())
    # single-PUT objects carry S3's CRC32, checked as they arrive: the manifest itself, and small files
    for pattern, read in ((rf"^GET /{BUCKET}/.*/policy/v00000001/config\.json$",
                           lambda: store.read_bytes("policy", 1, "config.json")),
                          (requests["GetObject manifest"], lambda: store.latest("policy"))):
        proxy.clear()
        proxy.add(pattern, "corrupt", times=None, fraction=0.5)
        with pytest.raises(StoreError, match=r"do not match the checksum stored with the object"):
            read()
    proxy.clear()
    # an object torn out of band (half of it rewritten in place of the whole)
    key = f"{store.root.partition('/')[2]}/policy/v00000001/model.safetensors"
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=MODEL[:len(MODEL) // 2])
    with pytest.raises(StoreIntegrityError, match=rf"\({len(MODEL) // 2} bytes\) does not match"):
        store.load_tensors("policy", 1)
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=MODEL)
    _assert_loads(store, 1, tmp_path)


def test_upload_left_by_a_killed_publisher_is_invisible_and_gc_aborts_it(proxy, store, s3, tmp_path):  # noqa: F811
    store.publish("policy", 1, {"model.safetensors": MODEL, "config.json": CONFIG})
    source = tmp_path / "model.safetensors"
    source.write_bytes(MODEL)
    part = _requests(store, 2)["UploadPart"]
    proxy.add(part, "stall", times=None, seconds=120)  # the publisher hangs in its upload ...
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, store.uri, proxy.endpoint, str(source)])
    try:
        deadline = time.monotonic() + 60
        while not proxy.requests(part):
            assert publisher.poll() is None, "the publisher ended before its upload"
            assert time.monotonic() < deadline, "the publisher never reached its part upload"
            time.sleep(0.05)
    finally:
        publisher.kill()  # ... and is killed there
        publisher.wait()
    proxy.clear()
    assert [u["Key"] for u in _uploads(s3, store)] == [_key(store, 2, "model.safetensors").split("/", 3)[3]]
    assert store.latest("policy").version == 1 and store.versions("policy") == [1]
    with pytest.raises(VersionNotFoundError):
        store.load_tensors("policy", 2)
    store.gc("policy", keep=5, stale_after_s=0)
    assert not _uploads(s3, store) and store.versions("policy") == [1]
    store.publish("policy", 2, {"model.safetensors": source, "config.json": CONFIG})
    _assert_loads(store, 2, tmp_path)
