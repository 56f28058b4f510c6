"""Load on one rollout service: a client that floods one Generate stream with thousands of requests gets
every answer while the server's memory stays bounded (it stops reading: backpressure), and a second
concurrent stream is refused instead of interleaving with the first."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc
import pytest

from tlt.rpc.client import open_channel, wait_ready
from tlt.rpc.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from tlt.store import ArtifactStore

REQUESTS = 2000
MAX_RUNNING = 16


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.fixture
def rollout_service(tmp_path, demo_model_dir):
    store = ArtifactStore(tmp_path / "store")
    store.publish("policy", 0, {"model.safetensors": demo_model_dir / "model.safetensors",
                                "config.json": demo_model_dir / "config.json"})
    port_file = tmp_path / "rollout.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlt.cli", "serve", "rollout", "--set", "rollout.speculative.mode=off",
         "--set", f"rollout.max_running={MAX_RUNNING}", "--set", f"output_dir={tmp_path}", "--port", "0",
         "--metrics-port", "0", "--threads", "1", "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not port_file.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "rollout service did not start"
        time.sleep(0.1)
    address = f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
    channel = open_channel(address)
    wait_ready(channel, address)
    yield proc, rollout_pb2_grpc.RolloutStub(channel)
    channel.close()
    proc.terminate()
    proc.wait(30)


def test_flooded_stream_is_answered_in_full_with_bounded_memory(rollout_service):
    proc, stub = rollout_service
    stub.LoadPolicy(rollout_pb2.LoadVersionRequest(version=-1), timeout=60)
    params = common_pb2.SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4, ignore_eos=True, seed=3)
    before = _rss_mb(proc.pid)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    flood = (rollout_pb2.GenerateRequest(request_id=f"r{i}", prompt_ids=[5, 6, 7, 8], params=params)
             for i in range(REQUESTS))
    start = time.perf_counter()
    events = stub.Generate(flood, timeout=600)
    first = next(events)
    # while the flood is being served, a second stream is refused, not interleaved
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(iter([rollout_pb2.GenerateRequest(request_id="x", prompt_ids=[5], params=params)]),
                           timeout=30))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rest = list(events)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    ids = [e.completion.request_id for e in [first, *rest] if e.HasField("completion")]
    assert len(ids) == REQUESTS and len(set(ids)) == REQUESTS
    assert rest[-1].HasField("summary")
    growth = peak[0] - before
    print(f"\nload: {REQUESTS} requests in one stream, {REQUESTS / seconds:.0f} req/s, service RSS "
          f"{before:.0f} MB -> peak {peak[0]:.0f} MB (+{growth:.0f} MB)")
    assert growth < 300, f"rollout service grew by {growth:.0f} MB under a request flood"
