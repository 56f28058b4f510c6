"""Load on one rollout service process (real gRPC over loopback, the demo model):

* a client floods one Generate stream with thousands of requests and stops reading its answers for a while:
  the service holds at most ``IN_FLIGHT_PER_SLOT`` unanswered requests per slot (waiting, decoding, or
  finished but not yet sent) and stops reading and decoding until the client reads again (backpressure, shown
  by its ``tlt_rollout_requests_unanswered`` gauge, which reaches that limit and never passes it); every
  request is answered, and a second concurrent stream is refused;
* many clients open their own stream at the same moment: one runs, the others are refused with
  ``FAILED_PRECONDITION`` and retry with backoff until served; every request of every stream is answered
  exactly once;
* one stream fills a 64-slot engine with a batch of demo-task prompts.

The service's RSS and its unanswered-requests gauge are sampled throughout; the figures are printed and
recorded as test-suite properties (``--junitxml`` carries them).
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest

from tests.processes import alive
from tests.reliability.service_process import ServiceProcess, spawn_service
from tlt.data.demo_task import generate_problems
from tlt.models.demo_training import encode
from tlt.rollout.service import IN_FLIGHT_PER_SLOT
from tlt.rpc.client import open_channel, wait_ready
from tlt.rpc.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from tlt.store import ArtifactStore

UNANSWERED = "tlt_rollout_requests_unanswered"
# RSS growth allowed while serving; buffering a flood's completions or requests without bound would still
# pass this for tiny requests, which is why the unanswered-requests gauge is checked as well
RSS_GROWTH_MB = 300


@dataclass
class RolloutService:
    """A ``tlt serve rollout`` process and a stub on it."""

    proc: subprocess.Popen
    stub: rollout_pb2_grpc.RolloutStub
    address: str
    metrics_port: int
    max_running: int

    @property
    def limit(self) -> int:
        """Unanswered requests of one stream beyond which the service stops reading it."""
        return IN_FLIGHT_PER_SLOT * self.max_running

    def scrape(self, name: str) -> dict[str, float]:
        """The samples of series ``name`` on the service's /metrics page, by their label text."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics?name[]={name}"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(name):
                series, value = line.rsplit(" ", 1)
                out[series[len(name):]] = float(value)
        return out

    def unanswered(self) -> int:
        return int(sum(self.scrape(UNANSWERED).values()))

    def finished(self) -> int:
        return int(sum(self.scrape("tlt_rollout_requests_finished_total").values()))

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024


@dataclass
class Watch:
    """Samples a service's RSS and unanswered-requests gauge in a thread until stopped."""

    service: RolloutService
    rss_before: float = 0.0
    rss_peak: float = 0.0
    rss_after: float = 0.0
    unanswered_peak: int = 0
    unanswered_last: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, self.service.rss_mb())
            self.unanswered_last = self.service.unanswered()
            self.unanswered_peak = max(self.unanswered_peak, self.unanswered_last)
            self.samples += 1
            self._stop.wait(0.02)

    @contextmanager
    def running(self) -> Iterator[Watch]:
        self.rss_before = self.rss_peak = self.service.rss_mb()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.rss_after = self.service.rss_mb()

    def figures(self) -> dict[str, float]:
        return {"unanswered_peak": self.unanswered_peak, "unanswered_limit": self.service.limit,
                "rss_before_mb": round(self.rss_before), "rss_peak_mb": round(self.rss_peak),
                "rss_after_mb": round(self.rss_after), "gauge_samples": self.samples}

    def check(self, rss_growth_mb: float = RSS_GROWTH_MB) -> None:
        """Backpressure held and reached its limit; memory stayed bounded; the service is alive and idle."""
        assert alive(self.service.proc.pid), "the rollout service died under load"
        assert self.unanswered_peak <= self.service.limit, (
            f"the service held {self.unanswered_peak} unanswered requests, over its limit of {self.service.limit}")
        assert self.unanswered_peak == self.service.limit, (
            f"the service never held its limit of {self.service.limit} unanswered requests "
            f"(peak {self.unanswered_peak}): the load did not reach backpressure")
        assert self.service.unanswered() == 0
        growth = self.rss_peak - self.rss_before
        assert growth < rss_growth_mb, f"rollout service RSS grew by {growth:.0f} MB under load"


def report(record: Callable[[str, object], None], what: str, figures: dict[str, float]) -> None:
    """Print the figures and record them as test-suite properties named ``load_<what>_<figure>`` (pytest's
    per-test ``record_property`` does not fit the default xunit2 report)."""
    for key, value in figures.items():
        record(f"load_{what.replace(' ', '_')}_{key}", value)
    print(f"\nload, {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture
def start_rollout(tmp_path, demo_model_dir) -> Iterator[Callable[[int], RolloutService]]:
    """Starts a rollout service process (speculative decoding off) with the given ``max_running``."""
    store = ArtifactStore(tmp_path / "store")
    store.publish("policy", 0, {"model.safetensors": demo_model_dir / "model.safetensors",
                                "config.json": demo_model_dir / "config.json"})
    started: list[tuple[ServiceProcess, grpc.Channel]] = []

    def start(max_running: int) -> RolloutService:
        service = spawn_service("rollout", None, tmp_path, f"rollout-{len(started)}", "--set",
                                "rollout.speculative.mode=off", "--set", f"rollout.max_running={max_running}",
                                "--set", f"output_dir={tmp_path}").wait_serving(120)
        channel = open_channel(service.address)
        started.append((service, channel))
        wait_ready(channel, service.address)
        stub = rollout_pb2_grpc.RolloutStub(channel)
        stub.LoadPolicy(rollout_pb2.LoadVersionRequest(version=-1), timeout=60)
        return RolloutService(service.proc, stub, service.address, service.metrics_port, max_running)

    yield start
    for service, channel in started:
        channel.close()
        service.stop()


def params(max_new_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, ignore_eos=True,
                                     seed=3)


def answered_ids(events: list[rollout_pb2.GenerateEvent]) -> list[str]:
    """The request ids of a stream's completions; the stream must end with its step summary."""
    assert events and events[-1].HasField("summary"), "the stream ended without a step summary"
    return [e.completion.request_id for e in events if e.HasField("completion")]


def test_flooded_stream_holds_backpressure_and_is_answered_in_full(start_rollout, record_testsuite_property):
    service = start_rollout(16)
    requests = 2000
    flood = (rollout_pb2.GenerateRequest(request_id=f"r{i}", prompt_ids=[5, 6, 7, 8], params=params(8))
             for i in range(requests))
    # A client that reads slowly: a small HTTP/2 receive window (no BDP probing to grow it), so the service's sends
    # block soon once the client stops reading.
    channel = grpc.insecure_channel(service.address, options=[("grpc.http2.bdp_probe", 0),
                                                              ("grpc.http2.lookahead_bytes", 16 * 1024)])
    with channel, Watch(service).running() as watch:
        events = rollout_pb2_grpc.RolloutStub(channel).Generate(flood, timeout=600)
        first = next(events)
        # The client stops reading. The service answers until flow control blocks its sends, then holds `limit`
        # unanswered requests and stops reading and decoding: neither requests nor answers pile up in it.
        deadline, last, still = time.monotonic() + 60, -1, 0
        while still < 5:
            assert time.monotonic() < deadline, "the service kept working for a client that reads nothing"
            finished = service.finished()
            still, last = (still + 1 if finished == last else 0), finished
            time.sleep(0.2)
        held = service.unanswered()
        assert held == service.limit, f"held {held} unanswered requests while the client read nothing"
        assert last < requests
        # while the flood is being served, a second stream is refused, not interleaved
        with pytest.raises(grpc.RpcError) as refused:
            list(service.stub.Generate(iter([rollout_pb2.GenerateRequest(request_id="x", prompt_ids=[5],
                                                                          params=params(4))]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        rest = list(events)
    ids = answered_ids([first, *rest])
    assert len(ids) == requests and set(ids) == {f"r{i}" for i in range(requests)}
    report(record_testsuite_property, "one flooded stream",
           {"requests": requests, "streams": 1, "finished_before_held": last, **watch.figures()})
    watch.check()


def test_concurrent_streams_are_served_one_at_a_time(start_rollout, record_testsuite_property):
    service = start_rollout(16)
    streams, per_stream = 12, 100  # each batch is over the limit (64), so every stream meets backpressure
    batches = [[f"s{s}-r{i}" for i in range(per_stream)] for s in range(streams)]
    answers: list[list[str] | None] = [None] * streams
    refusals = [0] * streams
    failures: list[str] = []
    barrier = threading.Barrier(streams)

    def client(s: int) -> None:
        rng = random.Random(s)
        delay = 0.05
        barrier.wait()
        while True:
            batch = (rollout_pb2.GenerateRequest(request_id=rid, prompt_ids=[5, 6, 7, 8], params=params(4))
                     for rid in batches[s])
            try:
                answers[s] = answered_ids(list(service.stub.Generate(batch, timeout=300)))
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    failures.append(f"stream {s}: {exc.code().name}: {exc.details()}")
                    return
            refusals[s] += 1
            time.sleep(delay * rng.uniform(0.5, 1.5))  # jitter, so the refused clients do not retry in lockstep
            delay = min(delay * 2, 1.0)

    with Watch(service).running() as watch:
        threads = [threading.Thread(target=client, args=(s,)) for s in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert not failures, failures
    for s in range(streams):
        assert answers[s] is not None and sorted(answers[s]) == sorted(batches[s]), f"stream {s} answered wrongly"
    handled = {labels: v for labels, v in service.scrape("tlt_rpc_server_handled_total").items()
               if 'method="Generate"' in labels}
    ok = sum(v for labels, v in handled.items() if 'code="OK"' in labels)
    refused = sum(v for labels, v in handled.items() if 'code="FAILED_PRECONDITION"' in labels)
    # one stream at a time: the others were refused (the gauge sums all open streams, so two streams read
    # side by side would also have pushed it over one stream's limit)
    assert ok == streams and refused == sum(refusals) >= 1, handled
    report(record_testsuite_property, "concurrent streams",
           {"requests": streams * per_stream, "streams": streams, "refusals": sum(refusals),
            "most_refusals_of_one_stream": max(refusals), **watch.figures()})
    watch.check()


def test_large_batch_fills_a_bigger_engine(start_rollout, record_testsuite_property):
    service = start_rollout(64)
    requests, new_tokens = 320, 32
    prompts = [encode(p.prompt) for p in generate_problems(requests, seed=11)]
    batch = (rollout_pb2.GenerateRequest(request_id=f"b{i}", prompt_ids=ids, params=params(new_tokens))
             for i, ids in enumerate(prompts))
    with Watch(service).running() as watch:
        events = list(service.stub.Generate(batch, timeout=600))
    ids = answered_ids(events)
    assert sorted(ids) == sorted(f"b{i}" for i in range(requests))
    assert all(len(e.completion.token_ids) == new_tokens for e in events if e.HasField("completion"))
    lengths = sorted(len(p) for p in prompts)
    report(record_testsuite_property, "one large batch",
           {"requests": requests, "streams": 1, "max_running": service.max_running, "new_tokens": new_tokens,
            "prompt_tokens_median": lengths[len(lengths) // 2], "prompt_tokens_max": lengths[-1],
            **watch.figures()})
    # a 64-prompt prefill attends over the whole static cache (64 x 4 heads x 171 x 2048 fp32 scores = 360 MB):
    # a cost per batch, set by max_running and the prompt length, not by how many requests the stream brings
    watch.check(rss_growth_mb=600)
