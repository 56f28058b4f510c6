"""A publish to a local store killed half-way (SIGKILL, by a real process) is invisible, and the next ``gc``
removes what it left at once, whatever its age; the staging of a writer that is still alive stays untouched
and its publish completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import alive
from tlt.store import ArtifactStore, VersionNotFoundError

pytestmark = pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(),
                                reason="a writer's life is read from /proc (Linux)")
TIMEOUT_S = 60.0
MIB = 1 << 20

# Publishes policy v2 with its model streamed from a named pipe: it blocks mid-copy until the test feeds it.
PIPE_PUBLISHER = """
import sys
from pathlib import Path
from tlt.store import ArtifactStore
ArtifactStore(sys.argv[1]).publish("policy", 2, {"config.json": b"{}", "model.json": Path(sys.argv[2])})
"""

# Writes a model to a scratch path on the store's disk (as the trainer service does), half now and half once
# told to go on, then publishes it as policy v2 by moving the file in.
SCRATCH_PUBLISHER = """
import sys
from tlt.store import ArtifactStore
store = ArtifactStore(sys.argv[1])
scratch = store.scratch_path("policy", "model.json")
half = int(sys.argv[2])
with open(scratch, "wb") as f:
    f.write(b"a" * half)
    f.flush()
    print(scratch, flush=True)
    sys.stdin.readline()
    f.write(b"b" * half)
store.publish("policy", 2, {"config.json": b"{}", "model.json": scratch}, move=True)
print("published", flush=True)
"""


def _wait_for(condition, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the publisher exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _staging(store_dir: Path) -> list[Path]:
    return sorted(p for p in (store_dir / "policy").iterdir() if p.name.startswith(".staging-"))


def test_publish_killed_mid_copy_is_invisible_and_the_next_gc_removes_its_staging(tmp_path):
    root = tmp_path / "store"
    store = ArtifactStore(root)
    store.publish("policy", 1, {"config.json": b"{}", "model.json": b"{}"})
    pipe = tmp_path / "model.pipe"
    os.mkfifo(pipe)
    # opened for reading too, so neither side waits for the other to open it and writes never hit a closed pipe
    feed = os.open(pipe, os.O_RDWR)
    proc = subprocess.Popen([sys.executable, "-c", PIPE_PUBLISHER, str(root), str(pipe)])
    try:
        for _ in range(8):  # 8 MiB of a larger model; each write returns once the publisher has read it
            os.write(feed, b"x" * MIB)

        def copied() -> bool:
            return any((s / "model.json").is_file() and (s / "model.json").stat().st_size > 0 for s in _staging(root))

        _wait_for(copied, "the model's first bytes reached its staging directory", proc)
        proc.send_signal(signal.SIGKILL)  # blocked reading the rest: certainly mid-publish
        proc.wait(TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(feed)
    [left] = _staging(root)
    assert (left / "config.json").is_file() and (left / "model.json").stat().st_size > 0
    assert f"-{proc.pid}-" in left.name  # the staging name records its writer
    assert store.versions("policy") == [1] and store.latest("policy").version == 1
    with pytest.raises(VersionNotFoundError):
        store.manifest("policy", 2)

    assert store.gc("policy", keep=5) == []  # default age limit (an hour): removed anyway, its writer is dead
    assert _staging(root) == [] and store.versions("policy") == [1]
    store.publish("policy", 2, {"config.json": b"{}", "model.json": b"[2]"})  # the number is free
    assert store.read_bytes("policy", 2, "model.json") == b"[2]"


def test_gc_leaves_a_live_writers_staging_alone_and_its_publish_completes(tmp_path):
    root = tmp_path / "store"
    store = ArtifactStore(root)
    store.publish("policy", 1, {"config.json": b"{}", "model.json": b"{}"})
    half = 4 * MIB
    proc = subprocess.Popen([sys.executable, "-c", SCRATCH_PUBLISHER, str(root), str(half)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        scratch = Path(proc.stdout.readline().strip())
        assert scratch.parent == root / "policy" and f"-{proc.pid}-" in scratch.name, scratch
        assert store.gc("policy", keep=5) == []
        assert alive(proc.pid) and scratch.stat().st_size == half and _staging(root) == [scratch]
        proc.stdin.write("go on\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "published"
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert store.latest("policy").version == 2
    assert store.read_bytes("policy", 2, "model.json") == b"a" * half + b"b" * half
    store.gc("policy", keep=5)
    assert _staging(root) == []
