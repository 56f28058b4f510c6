"""ArtifactStore: atomic versioned publish, verification, retention, refusal of pickles."""

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from tlt.store import (
    ArtifactStore,
    StoreError,
    StoreIntegrityError,
    VersionExistsError,
    VersionNotFoundError,
)

WEIGHTS = save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        return ArtifactStore(f"file://{tmp_path}/store")
    import uuid

    return ArtifactStore(f"memory://tlt-test-{uuid.uuid4().hex}")


def test_publish_fetch_round_trip(store, tmp_path):
    m = store.publish("policy", 1, {"model.safetensors": WEIGHTS, "config.json": b"{}"}, {"step": 1})
    assert store.latest("policy").version == 1 and m.metadata == {"step": 1}
    assert torch.equal(store.load_tensors("policy", 1)["w"], torch.arange(6.0).reshape(2, 3))
    dest = store.fetch("policy", 1, tmp_path / "local" / "v1")
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS and (dest / "MANIFEST.json").is_file()
    assert store.fetch("policy", 1, dest) == dest  # already there and verified


def test_latest_only_moves_forward_and_versions_are_complete_only(store):
    store.publish("drafter", 5, {"a.json": b"5"})
    store.publish("drafter", 3, {"a.json": b"3"})
    assert store.latest("drafter").version == 5
    assert store.versions("drafter") == [3, 5]
    assert store.latest("nothing") is None


def test_identical_republish_is_idempotent_and_different_content_refused(store):
    store.publish("policy", 2, {"a.json": b"x"})
    assert store.publish("policy", 2, {"a.json": b"x"}).version == 2
    with pytest.raises(VersionExistsError, match="policy v2 is already published"):
        store.publish("policy", 2, {"a.json": b"y"})


@pytest.mark.parametrize("name", ["model.bin", "weights.pt", "state.pkl", "../escape.json", "/abs.json",
                                  "MANIFEST.json"])
def test_pickles_and_bad_names_refused(store, name):
    with pytest.raises(StoreError) as info:
        store.publish("policy", 1, {name: b"\x80\x04."})
    assert name in str(info.value)
    assert store.versions("policy") == []


@pytest.mark.parametrize(("kind", "version"), [("Policy", 1), ("", 1), ("policy", -1), ("policy", True), ("a/b", 1)])
def test_bad_kind_or_version(store, kind, version):
    with pytest.raises(StoreError):
        store.publish(kind, version, {"a.json": b"1"})


def test_tampered_file_is_detected_and_nothing_left_at_dest(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"model.safetensors": WEIGHTS})
    path = tmp_path / "s" / "policy" / "v00000001" / "model.safetensors"
    path.write_bytes(WEIGHTS[:-1] + b"\x00")
    with pytest.raises(StoreIntegrityError, match="does not match the manifest"):
        store.load_tensors("policy", 1)
    with pytest.raises(StoreIntegrityError):
        store.fetch("policy", 1, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]


def test_interrupted_publish_is_invisible_and_collected(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"a.json": b"1"})
    partial = tmp_path / "s" / "policy" / "v00000002"
    partial.mkdir()
    (partial / "a.json").write_text("half")  # no manifest: a crash mid-publish
    staging = tmp_path / "s" / "policy" / ".staging-dead"
    staging.mkdir()
    assert store.versions("policy") == [1] and store.latest("policy").version == 1
    with pytest.raises(VersionNotFoundError):
        store.manifest("policy", 2)
    store.gc("policy", keep=5, stale_after_s=0)
    assert not partial.exists() and not staging.exists()
    store.publish("policy", 2, {"a.json": b"2"})  # the number is usable again
    assert store.latest("policy").version == 2


def test_latest_pointer_damage_falls_back_to_scan(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    store.publish("policy", 1, {"a.json": b"1"})
    store.publish("policy", 2, {"a.json": b"2"})
    (tmp_path / "s" / "policy" / "LATEST").write_text("garbage")
    assert store.latest("policy").version == 2
    (tmp_path / "s" / "policy" / "LATEST").write_text(json.dumps({"version": 9}))
    assert store.latest("policy").version == 2


def test_gc_keeps_newest_and_latest(store):
    for v in range(1, 6):
        store.publish("policy", v, {"a.json": str(v).encode()})
    assert store.gc("policy", keep=2) == [1, 2, 3]
    assert store.versions("policy") == [4, 5]
    with pytest.raises(StoreError):
        store.gc("policy", keep=0)


def test_concurrent_publishers_end_with_the_highest_latest(tmp_path):
    store = ArtifactStore(tmp_path / "s")
    threads = [threading.Thread(target=store.publish, args=("policy", v, {"a.json": str(v).encode()}))
               for v in range(1, 17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.versions("policy") == list(range(1, 17)) and store.latest("policy").version == 16
    assert not [p for p in Path(tmp_path / "s" / "policy").iterdir() if p.name.startswith(".")]
