"""Service lifecycle over real gRPC: a `tlt serve` process's probes and its drain on SIGTERM, the clients'
retries (idempotent calls only) and the rollout stall watchdog, and `tlt run --inproc` through the CLI giving
the same job as the multi-process default."""

from __future__ import annotations

import queue as queue_mod
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from tests.integration.conftest import TINY_JOB
from tests.processes import free_port, step_records
from tests.reliability.service_process import spawn_service
from tlt.config import apply_overrides, job_spec_from_dict
from tlt.drafter.service import RemoteDrafter
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.service import SERVICE_NAME as ROLLOUT_SERVICE
from tlt.rollout.service import RemoteRolloutWorker
from tlt.rollout.worker import RequestQueue, RolloutRequest
from tlt.rpc.client import open_channel, wait_ready
from tlt.rpc.errors import RpcError
from tlt.rpc.server import GrpcServer, start_server
from tlt.rpc.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc, rollout_pb2, rollout_pb2_grpc
from tlt.store import ArtifactStore


def _http(url: str) -> tuple[int, str]:
    """(status, stripped body) of a GET, 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()


# ---- a real `tlt serve rollout` process: probes and drain ---------------------------------------------------


@pytest.mark.usefixtures("demo_model_dir")
def test_serve_is_ready_then_drains_an_in_flight_generate_on_sigterm_and_exits_0(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"),
                                      "rollout": {"speculative": {"mode": "off"}}}))
    service = spawn_service("rollout", config, tmp_path, "rollout-0", "--grace", "120").wait_serving()
    try:
        probe = f"http://127.0.0.1:{service.metrics_port}"
        assert _http(f"{probe}/healthz") == (200, "ok")
        assert _http(f"{probe}/readyz") == (200, "ready")

        # a rollout step stays in flight until the client half-closes its request stream
        outbox: queue_mod.Queue = queue_mod.Queue()
        params = common_pb2.SamplingParams(temperature=1.0, max_new_tokens=4, seed=1)
        outbox.put(rollout_pb2.GenerateRequest(request_id="r0", prompt_ids=[5, 6], params=params))
        with open_channel(service.address) as channel:
            wait_ready(channel, service.address)
            call = rollout_pb2_grpc.RolloutStub(channel).Generate(iter(outbox.get, None), timeout=120)
            assert next(call).completion.request_id == "r0"  # the step runs on the server now

            service.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while (answer := _http(f"{probe}/readyz"))[0] == 200:
                assert time.monotonic() < deadline, "/readyz stayed 200 after SIGTERM"
                time.sleep(0.1)
            assert answer == (503, "not ready: shutting down")
            assert _http(f"{probe}/healthz") == (200, "ok")  # draining, not dead: no restart wanted
            assert service.proc.poll() is None, "the service exited with a call in flight"

            outbox.put(rollout_pb2.GenerateRequest(request_id="r1", prompt_ids=[7], params=params))
            outbox.put(None)  # half-close: the step ends once r1 is answered
            rest = list(call)
            assert call.code() == grpc.StatusCode.OK
        assert [e.completion.request_id for e in rest[:-1]] == ["r1"] and rest[-1].HasField("summary")
        assert service.proc.wait(60) == 0
        assert "shutting down" in service.log
    finally:
        service.stop()


# ---- client retries ----------------------------------------------------------------------------------------


class FlakyDrafter(drafter_pb2_grpc.DrafterServicer):
    """A drafter service that answers the first call of each method UNAVAILABLE (``fail_first``), as one that
    is restarting does, and counts the calls that reach it."""

    def __init__(self, fail_first: bool) -> None:
        self.fail_first = fail_first
        self.calls: Counter[str] = Counter()

    def _arrive(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        if self.fail_first and self.calls[method] == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: restarting")

    def Status(self, request, context):  # noqa: N802
        self._arrive("Status", context)
        return drafter_pb2.DrafterStatusResponse(version=3)

    def Publish(self, request, context):  # noqa: N802
        self._arrive("Publish", context)
        return drafter_pb2.PublishDrafterResponse(published=True, version=4)

    def PushDelta(self, request_iterator, context):  # noqa: N802
        for _ in request_iterator:
            pass
        self._arrive("PushDelta", context)
        return drafter_pb2.PushDeltaResponse(pending_workers=1)


def _serve(servicer, add, name: str, port: int = 0) -> GrpcServer:
    return start_server([(add, servicer, name)], port=port)


def test_an_idempotent_call_reaches_a_server_that_comes_up_a_moment_later():
    port, servicer, servers = free_port(), FlakyDrafter(fail_first=False), []
    starter = threading.Timer(0.5, lambda: servers.append(
        _serve(servicer, drafter_pb2_grpc.add_DrafterServicer_to_server, "tlt.v1.Drafter", port)))
    client = RemoteDrafter(f"127.0.0.1:{port}")
    try:
        start = time.monotonic()
        starter.start()
        assert client.status().version == 3  # UNAVAILABLE at first: retried with backoff until the server is up
        assert time.monotonic() - start >= 0.5 and servicer.calls["Status"] == 1
    finally:
        starter.join()
        client.close()
        for server in servers:
            server.stop(0)


def test_only_idempotent_calls_are_retried_on_unavailable():
    servicer = FlakyDrafter(fail_first=True)
    server = _serve(servicer, drafter_pb2_grpc.add_DrafterServicer_to_server, "tlt.v1.Drafter")
    client = RemoteDrafter(f"127.0.0.1:{server.port}")
    try:
        assert client.status().version == 3
        assert servicer.calls["Status"] == 2  # the refused attempt, then the retry
        # Publish merges pending deltas and PushDelta adds one: repeating either could count work twice
        with pytest.raises(RpcError, match=r"Publish on drafter service .* UNAVAILABLE: Publish: restarting"):
            client.publish({"step": 1})
        with pytest.raises(RpcError, match=r"PushDelta on drafter service .* UNAVAILABLE"):
            client.push_delta("w", {"a": torch.zeros(2)}, tokens=1)
        assert servicer.calls["Publish"] == 1 and servicer.calls["PushDelta"] == 1
        assert client.publish({"step": 1}) == 4  # the caller's own retry goes through
    finally:
        client.close()
        server.stop(0)


# ---- the rollout stall watchdog -----------------------------------------------------------------------------


class ScriptedRollout(rollout_pb2_grpc.RolloutServicer):
    """A rollout worker with one slot that answers each request ``delay_s`` after reading it and sends the
    summary when the client half-closes; ``delay_s=None``: it reads requests but never answers (a hung engine
    behind a live connection)."""

    def __init__(self, delay_s: float | None, decoding: bool = False) -> None:
        self.delay_s = delay_s
        self.decoding = decoding  # Progress shows decode iterations advancing (a long response, not a hang)
        self.progress_calls = 0
        self.received: list[str] = []

    def Progress(self, request, context):  # noqa: N802
        self.progress_calls += 1
        stats = common_pb2.SpecDecodeStats(plain_iterations=self.progress_calls if self.decoding else 0)
        return rollout_pb2.ProgressResponse(name="scripted", role=common_pb2.ROLE_ROLLOUT, max_running=1,
                                            stats=stats)

    def Generate(self, request_iterator, context) -> Iterator[rollout_pb2.GenerateEvent]:  # noqa: N802
        for request in request_iterator:
            self.received.append(request.request_id)
            if self.delay_s is not None:
                time.sleep(self.delay_s)
                yield rollout_pb2.GenerateEvent(completion=rollout_pb2.Completion(
                    request_id=request.request_id, token_ids=[1], logprobs=[0.0], finish_reason="stop"))
        if self.delay_s is not None:
            yield rollout_pb2.GenerateEvent(summary=rollout_pb2.StepSummary())


def _requests(n: int, prefix: str = "r") -> list[RolloutRequest]:
    return [RolloutRequest(f"{prefix}{i}", [3, 4], SamplingParams(max_new_tokens=2), 0) for i in range(n)]


def test_a_worker_that_stops_answering_is_cancelled_and_its_requests_go_back_to_the_queue():
    servicer = ScriptedRollout(delay_s=None)
    server = _serve(servicer, rollout_pb2_grpc.add_RolloutServicer_to_server, ROLLOUT_SERVICE)
    worker = RemoteRolloutWorker(f"127.0.0.1:{server.port}", stall_timeout_s=1.0)
    queue, step_over, failed = RequestQueue(_requests(3)), threading.Event(), []

    def run() -> None:
        try:
            worker.run_rollout(queue, lambda *_: failed.append("an answer from a hung worker"), step_over)
        except RpcError as exc:
            failed.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    elapsed = time.monotonic() - start
    step_over.set()  # without a watchdog the step hangs: end it so the test fails instead of hanging
    server.stop(0)
    thread.join(10)
    worker.close()
    assert len(failed) == 1 and isinstance(failed[0], RpcError), f"no stall detected within 30 s: {failed}"
    assert failed[0].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "owed 1 unanswered request(s) (stall_timeout_s=1)" in str(failed[0])
    assert 1.0 <= elapsed < 15
    assert servicer.received == ["r0"]
    assert [r.request_id for r in queue.take(10)] == ["r0", "r1", "r2"]  # the unanswered one is back, first


def test_the_stall_clock_runs_only_while_answers_are_owed():
    servicer = ScriptedRollout(delay_s=0.6)
    server = _serve(servicer, rollout_pb2_grpc.add_RolloutServicer_to_server, ROLLOUT_SERVICE)
    worker = RemoteRolloutWorker(f"127.0.0.1:{server.port}", stall_timeout_s=1.5)
    queue, step_over, results = RequestQueue(), threading.Event(), []

    def on_result(request: RolloutRequest, out) -> None:
        results.append(request.request_id)
        if len(results) == 4:
            step_over.set()

    # idle for longer than the stall timeout, then 4 answers 0.6 s apart: 2.4 s of work, no gap over 1.5 s
    threading.Timer(2.0, lambda: queue.extend(_requests(4))).start()
    try:
        summary = worker.run_rollout(queue, on_result, step_over)
    finally:
        worker.close()
        server.stop(0)
    assert results == ["r0", "r1", "r2", "r3"] and summary.worker == "scripted"


def test_a_long_response_that_keeps_decoding_is_not_a_stall():
    servicer = ScriptedRollout(delay_s=4.0, decoding=True)  # one response takes 4x the stall timeout
    server = _serve(servicer, rollout_pb2_grpc.add_RolloutServicer_to_server, ROLLOUT_SERVICE)
    worker = RemoteRolloutWorker(f"127.0.0.1:{server.port}", stall_timeout_s=1.0)
    queue, step_over, results = RequestQueue(_requests(1)), threading.Event(), []

    def on_result(request: RolloutRequest, out) -> None:
        results.append(request.request_id)
        step_over.set()

    try:
        worker.run_rollout(queue, on_result, step_over)
    finally:
        worker.close()
        server.stop(0)
    assert results == ["r0"]
    assert servicer.progress_calls >= 3  # the watchdog asked while the answer was overdue, and let it run


def test_stall_timeout_must_be_positive():
    with pytest.raises(ValueError, match=r"stall_timeout_s must be > 0 .* got 0"):
        RemoteRolloutWorker("127.0.0.1:1", stall_timeout_s=0)


# ---- `tlt run --inproc` through the CLI ---------------------------------------------------------------------

# Split processes reproduce one process exactly with one rollout worker and speculative decoding off.
EQUIVALENCE_JOB = {**TINY_JOB, "data.prompts_per_step": 2, "data.group_size": 2, "data.heldout": 4,
                   "rollout.max_new_tokens": 24, "rollout.workers": 1, "rollout.speculative.mode": "off"}


def _tlt_run(run_dir: Path, *flags: str) -> None:
    args = [f"--set={k}={v}" for k, v in EQUIVALENCE_JOB.items()]
    out = subprocess.run([sys.executable, "-m", "tlt.cli", "run", *args, "--output-dir", str(run_dir),
                          "--no-progress", "--no-report", *flags], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.usefixtures("demo_drafter_dir")
def test_tlt_run_inproc_gives_the_same_job_as_the_service_processes(tmp_path):
    _tlt_run(tmp_path / "inproc", "--inproc")
    _tlt_run(tmp_path / "split")
    assert not (tmp_path / "inproc" / "services").exists() and (tmp_path / "split" / "services").is_dir()
    a, b = step_records(tmp_path / "inproc"), step_records(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    assert [r["response_lengths"] for r in a] == [r["response_lengths"] for r in b]
    assert [r["reward_mean"] for r in a] == [r["reward_mean"] for r in b]
    assert [r["trainer"]["loss"] for r in a] == pytest.approx([r["trainer"]["loss"] for r in b], rel=1e-5)
    specs = [job_spec_from_dict(apply_overrides({}, {**EQUIVALENCE_JOB, "output_dir": str(tmp_path / d)}))
             for d in ("inproc", "split")]
    weights = [ArtifactStore(s.store_uri).load_tensors("policy", 2) for s in specs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
