"""ArtifactStore: atomic versioned publish, verification, retention, refusal of pickles.

Every store-generic test runs on the local filesystem (staging + rename) and on fsspec's in-memory
filesystem (the object-store path: files first, manifest last).
"""

import hashlib
import io
import json
import os
import pickle
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch
from safetensors.torch import save

from tlt.errors import TLTError
from tlt.store import (
    ArtifactStore,
    FileEntry,
    Manifest,
    StoreError,
    StoreIntegrityError,
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
    store.fs.pipe_file(path, data)


def _tamper(store: ArtifactStore, kind: str, version: int, name: str, data: bytes) -> None:
    _put(store, f"{store._version_dir(kind, version)}/{name}", data)


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
    bad = WEIGHTS[:-1] + b"\x00"
    _tamper(store, "policy", 1, "model.safetensors", bad)
    with pytest.raises(StoreIntegrityError, match=r"does not match the manifest"):
        store.load_tensors("policy", 1)
    with pytest.raises(StoreIntegrityError) as info:
        store.fetch("policy", 1, tmp_path / "dest")
    message = str(info.value)
    assert "policy v1/model.safetensors" in message and m.files["model.safetensors"].sha256 in message
    assert hashlib.sha256(bad).hexdigest() in message
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
    m = Manifest("policy", 3, {"a.json": FileEntry("ab" * 32, 2)}, {"step": 3}, 12.5)
    raw = json.loads(m.to_json())
    assert raw["files"]["a.json"] == {"sha256": "ab" * 32, "size": 2} and raw["created"] == 12.5
    assert Manifest.from_json(m.to_json()) == m


# ---- full disk, large files, tensor decoding --------------------------------------------------------


def test_full_disk_on_publish_names_the_path_and_the_sizes(tmp_path, monkeypatch):
    import tlt.store as store_module

    store = ArtifactStore(tmp_path / "s")
    payload = os.urandom(3 << 20)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 20))
    with pytest.raises(StoreError) as info:
        store.publish("policy", 1, {"model.safetensors": save({"w": torch.zeros(1)}), "a.json": payload})
    message = str(info.value)
    assert "No space left" in message and f"the disk holding {tmp_path / 's' / 'policy'} is full" in message
    assert "3.0 MiB needed, 1.0 MiB free" in message and "store.uri" in message
    assert store.versions("policy") == [] and not [p for p in (tmp_path / "s" / "policy").iterdir()
                                                   if p.name.startswith(".staging-")]


def test_full_disk_on_fetch_names_the_destination(tmp_path, monkeypatch):
    """A fake local filesystem whose writes under the fetch destination run out of space."""
    import builtins

    import tlt.store as store_module

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

    monkeypatch.setattr(store_module, "open", fake_open, raising=False)
    with pytest.raises(StoreError, match=r"fetch policy v1 into .*No space left on device; the disk holding "
                                         rf"{tmp_path / 'rollout'} is full \(4\.9 KiB needed, .* free\)"):
        store.fetch("policy", 1, tmp_path / "rollout" / "v1")
    assert not list((tmp_path / "rollout").iterdir())


def test_multi_chunk_files_hash_and_round_trip(store, tmp_path):
    """Files of several chunks (hashed on the helper thread) get the same checksums as hashlib."""
    big = os.urandom((8 << 20) * 2 + 12345)
    src = tmp_path / "big.json"
    src.write_bytes(big)
    m = store.publish("policy", 1, {"a.json": big, "b.json": src})
    assert m.files["a.json"] == m.files["b.json"] == FileEntry(hashlib.sha256(big).hexdigest(), len(big))
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
