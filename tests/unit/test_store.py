"""ArtifactStore: atomic versioned publish, verification, retention, refusal of pickles.

Every store-generic test runs on the local filesystem (staging + rename) and on fsspec's in-memory
filesystem (the object-store path: files first, manifest last).
"""

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch
import xxhash
from safetensors.torch import save

from tlt.errors import TLTError
from tlt.store import (
    DEFAULT_DIGEST,
    DIGESTS,
    ArtifactStore,
    FileEntry,
    Manifest,
    StoreError,
    StoreIntegrityError,
    UnknownDigestError,
    VersionExistsError,
    VersionNotFoundError,
)

WEIGHTS = save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        yield ArtifactStore(f"file://{tmp_path}/store")
        return
    uri = f"memory://tlt-test-{uuid.uuid4().hex}"
    s = ArtifactStore(uri)
    yield s
    if s.fs.exists(s.root):
        s.fs.rm(s.root, recursive=True)


def _put(store: ArtifactStore, path: str, data: bytes) -> None:
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if store.local and os.path.exists(path):  # published files are read-only: replace, as a bad copy would
        os.unlink(path)
    store.fs.pipe_file(path, data)


def _tamper(store: ArtifactStore, kind: str, version: int, name: str, data: bytes) -> None:
    _put(store, f"{store._version_dir(kind, version)}/{name}", data)


def _flip_last_byte(data: bytes) -> bytes:
    """The same bytes with the last one changed (overwriting it with a constant leaves random data intact 1 in 256)."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _xxh3(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _publish_legacy(store: ArtifactStore, kind: str, version: int, files: dict[str, bytes]) -> None:
    """Write a version exactly as tlt did before manifest entries named their digest (sha256 only)."""
    version_dir = store._version_dir(kind, version)
    for name, data in files.items():
        _put(store, f"{version_dir}/{name}", data)
    manifest = {"kind": kind, "version": version, "files": {n: {"sha256": _sha256(d), "size": len(d)}
                                                            for n, d in files.items()},
                "metadata": {"step": version}, "created": 1700000000.0}
    _put(store, f"{version_dir}/MANIFEST.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    store.fs.pipe_file(f"{store.root}/{kind}/LATEST", json.dumps({"version": version}).encode())


def test_publish_fetch_round_trip(store, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 3}')
    m = store.publish("policy", 1, {"model.safetensors": WEIGHTS, "config.json": config,
                                    "tok/vocab.json": b"[]"}, {"step": 1})
    assert m.metadata == {"step": 1} and m.files["config.json"].size == config.stat().st_size
    assert store.latest("policy") == m == store.manifest("policy", 1)
    assert Manifest.from_json(m.to_json()) == m
    assert torch.equal(store.load_tensors("policy", 1)["w"], torch.arange(6.0).reshape(2, 3))
    assert store.read_bytes("policy", 1, "config.json") == config.read_bytes()
    dest = store.fetch("policy", 1, tmp_path / "local" / "v1")
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS and (dest / "tok" / "vocab.json").read_bytes() == b"[]"
    assert Manifest.from_json((dest / "MANIFEST.json").read_text()) == m
    assert store.fetch("policy", 1, dest) == dest  # already there and verified: reused
    (dest / "config.json").write_text("{}")  # a damaged local copy is replaced
    assert store.fetch("policy", 1, dest) == dest and (dest / "config.json").read_bytes() == config.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["v1"]
    with pytest.raises(StoreError, match=r"has no file 'nope\.json'"):
        store.read_bytes("policy", 1, "nope.json")


def test_latest_only_moves_forward_and_versions_are_complete_only(store):
    assert store.latest("drafter") is None and store.versions("drafter") == []
    store.publish("drafter", 5, {"a.json": b"5"})
    store.publish("drafter", 3, {"a.json": b"3"})
    assert store.latest("drafter").version == 5
    assert json.loads(store.fs.cat_file(f"{store.root}/drafter/LATEST")) == {"version": 5}
    assert store.versions("drafter") == [3, 5]
    store.publish("drafter", 0, {"a.json": b"0"})
    assert store.latest("drafter").version == 5 and store.versions("drafter") == [0, 3, 5]
    assert store.versions("policy") == []  # kinds are independent
    with pytest.raises(VersionNotFoundError, match=r"drafter v4 is not in .*\[0, 3, 5\]"):
        store.manifest("drafter", 4)


def test_identical_republish_is_idempotent_and_different_content_refused(store):
    first = store.publish("policy", 2, {"a.json": b"x"}, {"try": 1})
    assert store.publish("policy", 2, {"a.json": b"x"}, {"try": 2}) == first  # a retry returns the original
    with pytest.raises(VersionExistsError, match=r"policy v2 is already published with different content"):
        store.publish("policy", 2, {"a.json": b"y"})
    with pytest.raises(VersionExistsError):
        store.publish("policy", 2, {"a.json": b"x", "b.json": b"x"})
    assert store.read_bytes("policy", 2, "a.json") == b"x"


@pytest.mark.parametrize("name", ["model.bin", "weights.pt", "state.pkl", "opt.pth", "model.ckpt"])
def test_pickle_files_refused(store, name):
    with pytest.raises(StoreError, match=r"safetensors only, no pickle") as info:
        store.publish("policy", 1, {"config.json": b"{}", name: pickle.dumps({"w": 1})})
    assert repr(name) in str(info.value) and isinstance(info.value, TLTError)
    assert store.versions("policy") == [] and store.latest("policy") is None


def test_pickle_renamed_to_safetensors_refused(store):
    with pytest.raises(StoreError, match=r"'model\.safetensors' is not a valid safetensors file.*no pickle"):
        store.publish("policy", 1, {"model.safetensors": pickle.dumps({"w": 1})})
    assert store.versions("policy") == []


@pytest.mark.parametrize("name", ["../escape.json", "a/../../b.json", "/abs.json", "./a.json", "a//b.json",
                                  "a\\b.json", "", "MANIFEST.json"])
def test_bad_file_names_refused(store, name):
    with pytest.raises(StoreError, match=r"is invalid") as info:
        store.publish("policy", 1, {name: b"{}"})
    assert repr(name) in str(info.value)
    assert store.versions("policy") == []


@pytest.mark.parametrize(("kind", "version"), [("Policy", 1), ("", 1), ("9p", 1), ("a/b", 1), ("../x", 1),
                                               ("policy", -1), ("policy", True), ("policy", 1.0),
                                               ("policy", "1"), ("policy", 10**8)])
def test_bad_kind_or_version(store, kind, version):
    with pytest.raises(StoreError, match=r"kind|version"):
        store.publish(kind, version, {"a.json": b"1"})


def test_bad_values_and_metadata_refused(store):
    with pytest.raises(StoreError, match=r"must be bytes or a pathlib\.Path, got str"):
        store.publish("policy", 1, {"a.json": "text"})
    with pytest.raises(StoreError, match=r"cannot read the source of 'a\.json'"):
        store.publish("policy", 1, {"a.json": Path("/nonexistent/a.json")})
    with pytest.raises(StoreError, match=r"metadata is not JSON-serializable"):
        store.publish("policy", 1, {"a.json": b"1"}, {"t": object()})
    with pytest.raises(StoreError, match=r"no files"):
        store.publish("policy", 1, {})
    assert store.versions("policy") == []


def test_tampered_file_is_detected_and_nothing_left_at_dest(store, tmp_path):
    m = store.publish("policy", 1, {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    bad = _flip_last_byte(WEIGHTS)
    _tamper(store, "policy", 1, "model.safetensors", bad)
    with pytest.raises(StoreIntegrityError, match=r"does not match the manifest"):
        store.load_tensors("policy", 1)
    with pytest.raises(StoreIntegrityError) as info:
        store.fetch("policy", 1, tmp_path / "dest")
    message = str(info.value)
    entry = m.files["model.safetensors"]
    assert entry == FileEntry("xxh3_128", _xxh3(WEIGHTS), len(WEIGHTS))  # the default digest
    assert "policy v1/model.safetensors" in message and f"xxh3_128 {_xxh3(bad)}" in message and entry.digest in message
    assert not (tmp_path / "dest").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]
    _tamper(store, "policy", 1, "model.safetensors", WEIGHTS + b"x")  # wrong size too
    with pytest.raises(StoreIntegrityError, match=f"{len(WEIGHTS) + 1} bytes"):
        store.read_bytes("policy", 1, "model.safetensors")
    store.fs.rm_file(f"{store._version_dir('policy', 1)}/config.json")
    with pytest.raises(StoreIntegrityError, match=r"config\.json is listed in the manifest but missing"):
        store.read_bytes("policy", 1, "config.json")


def test_corrupt_manifest_is_an_integrity_error(store):
    store.publish("policy", 1, {"a.json": b"1"})
    _tamper(store, "policy", 1, "MANIFEST.json", b"{not json")
    with pytest.raises(StoreIntegrityError, match=r"policy v1: .*MANIFEST\.json is unreadable"):
        store.manifest("policy", 1)


def test_interrupted_publish_is_invisible_and_collected(store):
    store.publish("policy", 1, {"a.json": b"1"})
    kind_dir = f"{store.root}/policy"
    _put(store, f"{kind_dir}/v00000002/a.json", b"half")  # no manifest: a crash mid-publish
    _put(store, f"{kind_dir}/.staging-dead/MANIFEST.json", b"{}")  # an abandoned staging dir
    _put(store, f"{kind_dir}/.staging-deadfile", b"{}")  # an abandoned LATEST temp file
    assert store.versions("policy") == [1] and store.latest("policy").version == 1
    with pytest.raises(VersionNotFoundError):
        store.manifest("policy", 2)
    store.gc("policy", keep=5)  # young leftovers may be publishes in progress: kept
    assert store.fs.exists(f"{kind_dir}/v00000002/a.json") and store.fs.exists(f"{kind_dir}/.staging-deadfile")
    assert store.gc("policy", keep=5, stale_after_s=0) == []
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(kind_dir, detail=False)}
    assert not {"v00000002", ".staging-dead", ".staging-deadfile"} & names and "v00000001" in names
    store.publish("policy", 2, {"a.json": b"2"})  # the number is usable again
    assert store.latest("policy").version == 2 and store.read_bytes("policy", 2, "a.json") == b"2"


def test_leftover_incomplete_version_is_replaced_on_publish(store):
    _put(store, f"{store.root}/policy/v00000003/old.json", b"half")
    store.publish("policy", 3, {"a.json": b"3"})
    assert store.manifest("policy", 3).files.keys() == {"a.json"}


def test_staging_is_never_visible(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"a.json": b"1"})
    seen, real_fsync = [], os.fsync

    def spy(fd):  # called while version 2's files are being staged
        seen.append((store.versions("policy"), store.latest("policy").version))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.publish("policy", 2, {"a.json": b"2", "b.json": b"2"})
    assert seen[:2] == [([1], 1), ([1], 1)] and store.versions("policy") == [1, 2]

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreError, match=r"publish policy v3 to .* failed: .*No space left"):
        store.publish("policy", 3, {"a.json": b"3"})
    assert store.versions("policy") == [1, 2] and store.latest("policy").version == 2
    assert not [p for p in (tmp_path / "s" / "policy").iterdir() if p.name.startswith(".staging-")]


def test_latest_pointer_damage_falls_back_to_scan(store):
    store.publish("policy", 1, {"a.json": b"1"})
    store.publish("policy", 2, {"a.json": b"2"})
    latest = f"{store.root}/policy/LATEST"
    for bad in (b"garbage", b'{"version": 9}', b'{"version": -1}', b"[]"):
        store.fs.pipe_file(latest, bad)
        assert store.latest("policy").version == 2
    store.fs.rm_file(latest)
    assert store.latest("policy").version == 2
    store.publish("policy", 3, {"a.json": b"3"})  # a missing pointer is recreated
    assert json.loads(store.fs.cat_file(latest)) == {"version": 3}


def test_gc_keeps_newest_and_latest(store):
    for v in range(1, 6):
        store.publish("policy", v, {"a.json": str(v).encode()})
    assert store.gc("policy", keep=2) == [1, 2, 3]
    assert store.versions("policy") == [4, 5] and store.latest("policy").version == 5
    store.publish("policy", 6, {"a.json": b"6"})
    store.fs.pipe_file(f"{store.root}/policy/LATEST", b'{"version": 4}')  # pinned (e.g. a rollback)
    assert store.gc("policy", keep=1) == [5]
    assert store.versions("policy") == [4, 6] and store.latest("policy").version == 4
    assert store.gc("nothing", keep=1) == []
    for keep in (0, -1, True, 1.5):
        with pytest.raises(StoreError, match=r"keep must be an integer >= 1"):
            store.gc("policy", keep=keep)


@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "store-per-thread"])
def test_concurrent_publishers_end_with_the_highest_latest(tmp_path, shared):
    root = tmp_path / "s"
    stores = [ArtifactStore(root)] * 16 if shared else [ArtifactStore(root) for _ in range(16)]
    errors = []

    def publish(s, v):
        try:
            s.publish("policy", v, {"a.json": str(v).encode()})
            s.publish("policy", 7, {"a.json": b"7"})  # everyone also retries one common version
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(s, v)) for v, s in enumerate(stores, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = ArtifactStore(root)
    assert s.versions("policy") == list(range(1, 17)) and s.latest("policy").version == 16
    assert {p.name for p in (root / "policy").iterdir() if p.name.startswith(".")} <= {".lock"}


def test_concurrent_publishers_on_memory_fs():
    store = ArtifactStore(f"memory://tlt-test-{uuid.uuid4().hex}")
    threads = [threading.Thread(target=store.publish, args=("policy", v, {"a.json": b"%d" % v}))
               for v in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.versions("policy") == list(range(8)) and store.latest("policy").version == 7
    store.fs.rm(store.root, recursive=True)


def test_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = ArtifactStore("relative/store")
    assert plain.local and plain.root == str(tmp_path / "relative" / "store")
    plain.publish("policy", 0, {"a.json": b"0"})
    assert (tmp_path / "relative/store/policy/v00000000/MANIFEST.json").is_file()
    assert ArtifactStore(f"file://{tmp_path}/relative/store").latest("policy").version == 0
    mem = ArtifactStore(f"memory://tlt-test-{uuid.uuid4().hex}", storage_options={})
    assert not mem.local
    with pytest.raises(StoreError, match=r"cannot be opened"):
        ArtifactStore("nosuchprotocol://bucket/x")
    assert isinstance(fsspec.filesystem("memory"), type(mem.fs))


def test_manifest_json_round_trip():
    files = {"a.json": FileEntry("xxh3_128", "ab" * 16, 2), "b.json": FileEntry("sha256", "cd" * 32, 5)}
    m = Manifest("policy", 3, files, {"step": 3}, 12.5)
    raw = json.loads(m.to_json())
    assert raw["files"]["a.json"] == {"algorithm": "xxh3_128", "digest": "ab" * 16, "size": 2}
    # sha256 entries keep the key older tlt reads, so they stay readable by it
    assert raw["files"]["b.json"] == {"algorithm": "sha256", "digest": "cd" * 32, "sha256": "cd" * 32, "size": 5}
    assert raw["created"] == 12.5 and raw["kind"] == "policy" and raw["version"] == 3 and raw["metadata"] == {"step": 3}
    assert Manifest.from_json(m.to_json()) == m
    legacy = {"kind": "policy", "version": 3, "files": {"a.json": {"sha256": "ef" * 32, "size": 2}}}
    assert Manifest.from_json(json.dumps(legacy)).files == {"a.json": FileEntry("sha256", "ef" * 32, 2)}


@pytest.mark.parametrize(("entry", "error"), [
    ({"algorithm": "xxh3_128", "digest": "ab" * 32, "size": 2}, r"not 32 lowercase hex digits"),
    ({"algorithm": "sha256", "digest": "AB" * 32, "size": 2}, r"not 64 lowercase hex digits"),
    ({"algorithm": "sha256", "digest": "ab" * 32, "sha256": "cd" * 32, "size": 2}, r"contradicts its digest"),
    ({"algorithm": "xxh3_128", "digest": "ab" * 16, "sha256": "ab" * 16, "size": 2}, r"contradicts its digest"),
    ({"algorithm": "xxh3_128", "digest": "ab" * 16, "size": -1}, r"not a byte count"),
    ({"algorithm": "xxh3_128", "size": 2}, r"digest"),
    ({"size": 2}, r"sha256"),
])
def test_malformed_manifest_entries_are_integrity_errors(store, entry, error):
    store.publish("policy", 1, {"a.json": b"1"})
    raw = json.loads(store.fs.cat_file(f"{store._version_dir('policy', 1)}/MANIFEST.json"))
    raw["files"]["a.json"] = entry
    _tamper(store, "policy", 1, "MANIFEST.json", json.dumps(raw).encode())
    with pytest.raises(StoreIntegrityError, match=rf"MANIFEST\.json is unreadable .*{error}"):
        store.manifest("policy", 1)


def test_unknown_digest_algorithm_asks_for_an_upgrade(store):
    store.publish("policy", 1, {"a.json": b"1"})
    raw = json.loads(store.fs.cat_file(f"{store._version_dir('policy', 1)}/MANIFEST.json"))
    raw["files"]["a.json"] = {"algorithm": "blake3", "digest": "ab" * 32, "size": 1}
    _tamper(store, "policy", 1, "MANIFEST.json", json.dumps(raw).encode())
    with pytest.raises(UnknownDigestError, match=r"policy v1: .*MANIFEST\.json: digest algorithm 'blake3' is unknown "
                                                 r"to this tlt \(it knows xxh3_128, sha256\).*upgrade tlt") as info:
        store.read_bytes("policy", 1, "a.json")
    assert isinstance(info.value, StoreError)


# ---- digests: xxh3 by default, sha256 on request, old sha256 manifests ---------------------------------


@pytest.mark.parametrize("digest", ["md5", "SHA256", "xxh3", "", None, 256])
def test_digest_option_is_validated(tmp_path, digest):
    with pytest.raises(StoreError, match=rf"store option digest={digest!r} is not supported: choose one of "
                                         r"'xxh3_128', 'sha256'"):
        ArtifactStore(tmp_path / "s", digest=digest)
    assert not (tmp_path / "s").exists()  # refused before anything is created
    assert DIGESTS == ("xxh3_128", "sha256") and DEFAULT_DIGEST == "xxh3_128"
    assert ArtifactStore(tmp_path / "ok").digest == "xxh3_128"


def test_old_sha256_manifests_still_load_and_verify(store, tmp_path):
    config = b'{"hidden_size": 3}'
    _publish_legacy(store, "policy", 4, {"model.safetensors": WEIGHTS, "config.json": config})
    m = store.latest("policy")
    assert m.version == 4 and m.metadata == {"step": 4} and store.versions("policy") == [4]
    assert m.files["model.safetensors"] == FileEntry("sha256", _sha256(WEIGHTS), len(WEIGHTS))
    assert torch.equal(store.load_tensors("policy", 4)["w"], torch.arange(6.0).reshape(2, 3))
    assert store.read_bytes("policy", 4, "config.json") == config
    dest = store.fetch("policy", 4, tmp_path / "rollout" / "v4")
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS
    assert Manifest.from_json((dest / "MANIFEST.json").read_bytes()) == m
    assert store.fetch("policy", 4, dest) == dest  # the local copy verifies by sha256 too: reused
    # a retry of the same content under the old version is recognised (hashed with sha256 to compare) ...
    assert store.publish("policy", 4, {"model.safetensors": WEIGHTS, "config.json": config}) == m
    with pytest.raises(VersionExistsError):  # ... different content is not
        store.publish("policy", 4, {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    new = store.publish("policy", 5, {"model.safetensors": WEIGHTS})  # next to it, new versions use xxh3
    assert new.files["model.safetensors"].algorithm == "xxh3_128" and store.versions("policy") == [4, 5]
    bad = _flip_last_byte(WEIGHTS)  # and old versions still catch damage
    _tamper(store, "policy", 4, "model.safetensors", bad)
    for read in (lambda: store.load_tensors("policy", 4), lambda: store.read_bytes("policy", 4, "model.safetensors"),
                 lambda: store.fetch("policy", 4, tmp_path / "rollout" / "again")):
        with pytest.raises(StoreIntegrityError, match=rf"sha256 {_sha256(bad)} \({len(bad)} bytes\) does not match "
                                                      rf"the manifest's {_sha256(WEIGHTS)}"):
            read()
    assert not (tmp_path / "rollout" / "again").exists()


def test_concurrent_retry_with_another_digest_is_idempotent(store, monkeypatch):
    """A publisher that finds the version committed meanwhile by one using another digest compares content."""
    sha = ArtifactStore(store.uri, digest="sha256")
    first = sha.publish("policy", 1, {"model.safetensors": WEIGHTS, "a.json": b"1"})
    real, calls = ArtifactStore._read_manifest, []

    def late(self, kind, version):  # the pre-check misses the version (published in between)
        calls.append(version)
        return None if len(calls) == 1 else real(self, kind, version)

    monkeypatch.setattr(ArtifactStore, "_read_manifest", late)
    assert store.publish("policy", 1, {"model.safetensors": WEIGHTS, "a.json": b"1"}) == first
    calls.clear()
    with pytest.raises(VersionExistsError):
        store.publish("policy", 1, {"model.safetensors": WEIGHTS, "a.json": b"2"})
    monkeypatch.undo()
    assert store.manifest("policy", 1) == first
    if store.local:  # (object stores have no staging: there each kind must have a single writer, see store.py)
        assert store.read_bytes("policy", 1, "a.json") == b"1"
        assert not [p for p in Path(store.root, "policy").iterdir() if p.name.startswith(".staging-")]


def test_xxh3_detects_one_flipped_bit_and_torn_writes(store, tmp_path):
    big = os.urandom((3 << 20) + 77)  # several chunks
    m = store.publish("policy", 1, {"a.json": big})
    assert m.files["a.json"] == FileEntry("xxh3_128", _xxh3(big), len(big))
    damaged = {"flipped bit": big[:2 << 20] + bytes([big[2 << 20] ^ 0x10]) + big[(2 << 20) + 1:],
               "torn write": big[:1 << 20] + bytes(len(big) - (1 << 20)),  # the tail never reached the disk
               "truncated": big[:-1], "swapped": os.urandom(len(big))}
    for what, data in damaged.items():
        _tamper(store, "policy", 1, "a.json", data)
        with pytest.raises(StoreIntegrityError, match=rf"xxh3_128 {_xxh3(data)} \({len(data)} bytes\) does not match"):
            store.read_bytes("policy", 1, "a.json")
        with pytest.raises(StoreIntegrityError, match=r"does not match the manifest"):
            store.fetch("policy", 1, tmp_path / "d")
        assert not (tmp_path / "d").exists(), what


def test_sha256_option_publishes_sha256_and_stores_read_each_other(store, tmp_path):
    sha = ArtifactStore(store.uri, digest="sha256")
    big = os.urandom((1 << 20) * 3 + 5)  # large chunks: hashed on the helper thread
    m = sha.publish("drafter", 1, {"model.safetensors": WEIGHTS, "a.json": big})
    assert m.files == {"model.safetensors": FileEntry("sha256", _sha256(WEIGHTS), len(WEIGHTS)),
                       "a.json": FileEntry("sha256", _sha256(big), len(big))}
    raw = json.loads(store.fs.cat_file(f"{store._version_dir('drafter', 1)}/MANIFEST.json"))
    # readable by tlt before explicit algorithms (it read e["sha256"] and e["size"] only)
    assert {n: (e["sha256"], e["size"]) for n, e in raw["files"].items()} == {
        n: (e.digest, e.size) for n, e in m.files.items()}
    assert store.read_bytes("drafter", 1, "a.json") == big  # an xxh3 store verifies sha256 versions
    assert torch.equal(store.load_tensors("drafter", 1)["w"], torch.arange(6.0).reshape(2, 3))
    assert store.publish("drafter", 1, {"model.safetensors": WEIGHTS, "a.json": big}) == m  # an idempotent retry
    new = store.publish("drafter", 2, {"a.json": big})
    assert new.files["a.json"] == FileEntry("xxh3_128", _xxh3(big), len(big))
    assert sha.read_bytes("drafter", 2, "a.json") == big and sha.latest("drafter") == new
    assert (sha.fetch("drafter", 2, tmp_path / "d") / "a.json").read_bytes() == big
    _tamper(store, "drafter", 1, "a.json", _flip_last_byte(big))
    with pytest.raises(StoreIntegrityError, match=r"a\.json: sha256 .* does not match"):
        sha.fetch("drafter", 1, tmp_path / "e")


# ---- full disk, large files, tensor decoding --------------------------------------------------------


def test_full_disk_on_publish_names_the_path_and_the_sizes(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "s")
    payload = os.urandom(3 << 20)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 20))
    with pytest.raises(StoreError) as info:
        store.publish("policy", 1, {"model.safetensors": save({"w": torch.zeros(1)}), "a.json": payload})
    message = str(info.value)
    assert "No space left" in message and f"the disk holding {tmp_path / 's' / 'policy'} is full" in message
    assert "3.0 MiB needed, 1.0 MiB free" in message and "store.uri" in message
    assert store.versions("policy") == [] and not [p for p in (tmp_path / "s" / "policy").iterdir()
                                                   if p.name.startswith(".staging-")]


@pytest.mark.parametrize("supported", [True, False])
def test_publish_starts_writeback_early_and_still_fsyncs(tmp_path, monkeypatch, supported):
    import tlt.store.streams as streams

    ranges, synced, real_fsync = [], [], os.fsync

    def sync_file_range(fd, offset, nbytes, flags):  # records; "unsupported" fails like ENOSYS would
        ranges.append((offset, nbytes, flags))
        return 0 if supported else -1

    def fsync(fd):
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(streams, "sync_file_range", lambda: sync_file_range)
    monkeypatch.setattr(os, "fsync", fsync)
    big = os.urandom((20 << 20) + 3)
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"a.json": big, "b.json": b"small"})
    if supported:  # contiguous 8 MiB ranges started while copying; the tail is left to the fsync
        assert ranges == [(0, 8 << 20, 2), (8 << 20, 8 << 20, 2)]
    else:  # tried once, then fsync alone
        assert ranges == [(0, 8 << 20, 2)]
    assert synced[:2] == [len(big), len(b"small")] and len(synced) >= 3  # every file, then the manifest
    assert store.read_bytes("policy", 1, "a.json") == big
    ranges.clear()
    synced.clear()
    src = tmp_path / "big.json"  # from a file: the same hints
    src.write_bytes(big)
    store.publish("policy", 2, {"a.json": src})
    assert ranges == ([(0, 8 << 20, 2), (8 << 20, 8 << 20, 2)] if supported else [(0, 8 << 20, 2)])
    assert synced[0] == len(big) and store.read_bytes("policy", 2, "a.json") == big


def test_full_disk_on_fetch_names_the_destination(tmp_path, monkeypatch):
    """A fake local filesystem whose writes under the fetch destination run out of space."""
    import builtins

    import tlt.store.artifact_store as artifact_store

    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"a.json": b"x" * 5000})
    real_open = builtins.open

    class FullFile(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(28, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(tmp_path / "rollout") in str(path):
            return FullFile()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(artifact_store, "open", fake_open, raising=False)
    with pytest.raises(StoreError, match=r"fetch policy v1 into .*No space left on device; the disk holding "
                                         rf"{tmp_path / 'rollout'} is full \(4\.9 KiB needed, .* free\)"):
        store.fetch("policy", 1, tmp_path / "rollout" / "v1")
    assert not list((tmp_path / "rollout").iterdir())


@pytest.mark.parametrize("digest", DIGESTS)
def test_multi_chunk_files_hash_and_round_trip(store, tmp_path, digest):
    """Files of several chunks (sha256: hashed on the helper thread) get the same checksums as one-shot hashing."""
    store = ArtifactStore(store.uri, digest=digest)
    big = os.urandom((8 << 20) * 2 + 12345)
    src = tmp_path / "big.json"
    src.write_bytes(big)
    m = store.publish("policy", 1, {"a.json": big, "b.json": src})
    expected = _sha256(big) if digest == "sha256" else _xxh3(big)
    assert m.files["a.json"] == m.files["b.json"] == FileEntry(digest, expected, len(big))
    assert store.read_bytes("policy", 1, "b.json") == big
    assert (store.fetch("policy", 1, tmp_path / "d") / "a.json").read_bytes() == big


def test_load_tensors_decodes_like_safetensors(store):
    from safetensors.torch import load

    tensors = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(7).half(), "i64": torch.arange(5),
               "u8": torch.arange(9, dtype=torch.uint8), "flag": torch.tensor([True, False, True]),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    data = save(tensors, metadata={"format": "pt"})
    store.publish("policy", 1, {"model.safetensors": data})
    ours, theirs = store.load_tensors("policy", 1), load(data)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape and torch.equal(ours[key], value)
    ours["bf16"] += 1  # writable, and independent of the next load
    assert torch.equal(store.load_tensors("policy", 1)["bf16"], tensors["bf16"])


def test_load_tensors_of_a_large_file(store):
    """A large file is read into one huge-page-advised buffer: its tensors are writable, independent of
    other loads, and keep the buffer alive as long as any of them lives."""
    import gc

    tensors = {"a": torch.randn(1 << 20), "b": torch.arange(3 << 20, dtype=torch.int16).view(3, -1)}
    store.publish("policy", 1, {"model.safetensors": save(tensors)})  # ~10 MiB
    first, second = store.load_tensors("policy", 1), store.load_tensors("policy", 1)
    assert all(torch.equal(first[k], v) and first[k].dtype == v.dtype for k, v in tensors.items())
    first["a"].add_(1)
    assert torch.equal(second["a"], tensors["a"])
    row = second["b"][2]
    del first, second
    gc.collect()
    assert torch.equal(row, tensors["b"][2])


@pytest.mark.parametrize("header", [{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                                    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                                    {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}},
                                    {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                                    {"w": {"dtype": "F32"}}])
def test_load_tensors_refuses_malformed_safetensors(store, header):
    raw = json.dumps(header).encode()
    data = len(raw).to_bytes(8, "little") + raw + bytes(8)
    store.publish("policy", 1, {"model.safetensors": data})  # a JSON-object header passes publish's check
    with pytest.raises(StoreIntegrityError, match=r"policy v1/model\.safetensors is not a valid safetensors file"):
        store.load_tensors("policy", 1)


def test_a_full_disk_maps_to_resource_exhausted_over_grpc():
    import errno

    import grpc

    from tlt.rpc.errors import status_for
    from tlt.store import ArtifactStore, StoreFullError

    error = ArtifactStore.__new__(ArtifactStore)
    error._s3 = None
    full = error._failure("publish policy v1", OSError(errno.ENOSPC, "No space left on device"), Path("/tmp"), 10)
    assert isinstance(full, StoreFullError) and "No space left" in str(full)
    assert status_for(full) == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- zero-copy transport on one filesystem: publish(move=True) and fetch's hard links ---------------


def test_move_publish_renames_the_producers_file_into_the_version(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    scratch = store.scratch_path("policy", "model.safetensors")
    scratch.write_bytes(WEIGHTS)
    inode = scratch.stat().st_ino
    config = tmp_path / "config.json"  # not in the store's directory, but on its filesystem: moved as well
    config.write_bytes(b"{}")
    m = store.publish("policy", 1, {"model.safetensors": scratch, "config.json": config}, move=True)
    published = Path(store._version_dir("policy", 1)) / "model.safetensors"
    assert published.stat().st_ino == inode  # renamed, never copied
    assert not scratch.exists() and not config.exists()
    assert published.stat().st_mode & 0o777 == 0o444  # published files never change
    assert m.files["model.safetensors"] == FileEntry("xxh3_128", _xxh3(WEIGHTS), len(WEIGHTS))
    assert torch.equal(store.load_tensors("policy", 1)["w"], torch.arange(6.0).reshape(2, 3))


def test_failed_move_publish_gives_the_files_back(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"a.json": b"1"})
    src = store.scratch_path("policy", "a.json")
    src.write_bytes(b"2")
    with pytest.raises(VersionExistsError):  # a conflict: nothing accepted
        store.publish("policy", 1, {"a.json": src}, move=True)
    assert src.read_bytes() == b"2"
    real_rename = os.rename

    def rename(a, b):
        if Path(b).name == "v00000002":
            raise OSError(5, "Input/output error")  # the commit itself fails
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(StoreError, match=r"publish policy v2 .* failed"):
        store.publish("policy", 2, {"a.json": src}, move=True)
    monkeypatch.undo()
    assert src.read_bytes() == b"2" and os.access(src, os.W_OK)
    assert store.versions("policy") == [1]
    assert store.publish("policy", 1, {"a.json": store_bytes(tmp_path, b"1")}, move=True).version == 1


def store_bytes(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"src-{uuid.uuid4().hex}.json"
    path.write_bytes(data)
    return path


def test_move_publish_of_an_identical_retry_or_another_filesystem_consumes_the_source(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"a.json": b"1"})
    retry = store_bytes(tmp_path, b"1")
    store.publish("policy", 1, {"a.json": retry}, move=True)  # the same content: accepted, so taken
    assert not retry.exists()
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem to publish from")
    other = shm / f"tlt-test-{uuid.uuid4().hex}.json"
    other.write_bytes(b"2")
    try:
        store.publish("policy", 2, {"a.json": other}, move=True)  # copied across filesystems, then removed
        assert not other.exists() and store.read_bytes("policy", 2, "a.json") == b"2"
    finally:
        other.unlink(missing_ok=True)


def test_fetch_hard_links_verified_files_on_the_same_filesystem(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"model.safetensors": WEIGHTS, "a.json": b"1"})
    stored = Path(store._version_dir("policy", 1)) / "model.safetensors"
    linked = store.fetch("policy", 1, tmp_path / "linked", link=True) / "model.safetensors"
    copied = store.fetch("policy", 1, tmp_path / "copied") / "model.safetensors"  # private copies by default
    assert linked.stat().st_ino == stored.stat().st_ino
    assert copied.stat().st_ino != stored.stat().st_ino and os.access(copied, os.W_OK)
    assert linked.read_bytes() == copied.read_bytes() == WEIGHTS
    _tamper(store, "policy", 1, "a.json", b"2")  # a damaged store file is refused, linked or not
    with pytest.raises(StoreIntegrityError, match=r"does not match the manifest"):
        store.fetch("policy", 1, tmp_path / "again", link=True)
    assert not (tmp_path / "again").exists()


def test_scratch_paths_are_local_only_and_collected_when_stale(tmp_path):
    assert ArtifactStore(f"memory://tlt-test-{uuid.uuid4().hex}").scratch_path("policy", "a.json") is None
    store = ArtifactStore(tmp_path / "s")
    left = store.scratch_path("policy", "model.safetensors")
    left.write_bytes(WEIGHTS)  # a producer that died before publishing
    assert store.versions("policy") == [] and store.latest("policy") is None
    store.gc("policy", keep=1, stale_after_s=0)
    assert not left.exists()
    with pytest.raises(StoreError, match=r"scratch"):
        store.scratch_path("policy", "../escape.json")


# ---- staging left by a dead writer: collected at the next gc, whatever its age --------------------------

_SCRATCH_WRITER = """
import sys
from tlt.store import ArtifactStore
path = ArtifactStore(sys.argv[1]).scratch_path("policy", "model.safetensors")
path.write_bytes(b"half a model")
print(path, flush=True)
sys.stdin.read()  # a live writer until the test closes its stdin
"""


def _scratch_writer(root: Path) -> tuple[subprocess.Popen, Path]:
    """A process that has written a scratch file into the store at ``root`` and waits; (process, file)."""
    proc = subprocess.Popen([sys.executable, "-c", _SCRATCH_WRITER, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="writer liveness is read from /proc (Linux)")
def test_gc_removes_staging_of_dead_writers_at_once_and_keeps_live_and_foreign_ones(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"a.json": b"1"})
    dead, dead_file = _scratch_writer(tmp_path / "s")
    live, live_file = _scratch_writer(tmp_path / "s")
    dead.stdin.close()
    dead.wait(60)
    kind_dir = tmp_path / "s" / "policy"
    _, host, pid, start = re.match(r"(\.staging-[0-9a-f]{32})-([0-9a-f]{16})-(\d+)-(\d+)", live_file.name).groups()
    assert int(pid) == live.pid  # the name records its writer
    other_host = kind_dir / f".staging-{uuid.uuid4().hex}-{'0' * 16}-{dead.pid}-{start}"  # its writer's life is unknown
    reused = kind_dir / f".staging-{uuid.uuid4().hex}-{host}-{live.pid}-{int(start) + 1}"  # same PID, another process
    legacy = kind_dir / ".staging-from-an-older-tlt"
    for path in (other_host, reused, legacy):
        path.mkdir()
        (path / "a.json").write_bytes(b"half")
    try:
        assert store.gc("policy", keep=1) == []  # young: only the dead writers' leftovers go
        assert not dead_file.exists() and not reused.exists()
        assert live_file.read_bytes() == b"half a model" and other_host.is_dir() and legacy.is_dir()
        assert store.versions("policy") == [1]
    finally:
        live.stdin.close()
        live.wait(60)
    store.gc("policy", keep=1)  # its writer has exited now
    assert not live_file.exists() and other_host.is_dir() and legacy.is_dir()
    store.gc("policy", keep=1, stale_after_s=0)  # the age rule still holds for everything else
    assert not [p for p in kind_dir.iterdir() if p.name.startswith(".staging-")]
