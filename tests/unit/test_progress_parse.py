"""The operator's metrics reader: Prometheus text rendered by prometheus_client parses back to the same
progress (property tests), and the Prometheus-API source reads the same series from a query answer."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from tlt_operator.planner import WorkerProgress
from tlt_operator.progress import (
    PrometheusSource,
    Target,
    parse_controller_page,
    parse_worker_page,
)

counts = st.integers(0, 10**9)
names = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24)
pod_names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
workers = st.builds(WorkerProgress, name=names, running=counts, queued=counts, finished=counts,
                    buffered_responses=counts)


def render_workers(progress: list[WorkerProgress], roles: dict[str, str] | None = None,
                   versions: dict[str, tuple[int, int]] | None = None) -> str:
    """A rollout page the way a worker exports it (independent of the tlt.metrics helpers)."""
    registry = CollectorRegistry()
    running = Gauge("tlt_rollout_requests_running", "h", ["worker"], registry=registry)
    queued = Gauge("tlt_rollout_requests_queued", "h", ["worker"], registry=registry)
    finished = Counter("tlt_rollout_requests_finished", "h", ["worker"], registry=registry)
    buffered = Gauge("tlt_rollout_buffered_responses", "h", ["worker"], registry=registry)
    role = Gauge("tlt_rollout_role", "h", ["worker", "role"], registry=registry)
    policy = Gauge("tlt_rollout_policy_version", "h", ["worker"], registry=registry)
    drafter = Gauge("tlt_rollout_drafter_version", "h", ["worker"], registry=registry)
    for w in progress:
        running.labels(w.name).set(w.running)
        queued.labels(w.name).set(w.queued)
        finished.labels(w.name).inc(w.finished)
        buffered.labels(w.name).set(w.buffered_responses)
        current = (roles or {}).get(w.name, "rollout")
        for r in ("rollout", "drafter"):
            role.labels(w.name, r).set(1 if r == current else 0)
        p, d = (versions or {}).get(w.name, (0, 0))
        policy.labels(w.name).set(p)
        drafter.labels(w.name).set(d)
    return generate_latest(registry).decode()


@settings(max_examples=200, deadline=None)
@given(workers, st.sampled_from(["rollout", "drafter"]), counts, counts)
def test_worker_page_round_trips(worker, role, policy_version, drafter_version):
    text = render_workers([worker], {worker.name: role}, {worker.name: (policy_version, drafter_version)})
    parsed = parse_worker_page(text, worker.name)
    assert parsed is not None
    assert parsed.progress() == worker
    assert (parsed.role, parsed.policy_version, parsed.drafter_version) == (role, policy_version, drafter_version)


@settings(max_examples=100, deadline=None)
@given(st.lists(workers, min_size=2, max_size=5, unique_by=lambda w: w.name), st.data())
def test_each_worker_is_found_on_a_shared_page(many, data):
    """A page with several workers (e.g. federated) yields each one by its worker label."""
    text = render_workers(many)
    pick = data.draw(st.sampled_from(many))
    parsed = parse_worker_page(text, pick.name)
    assert parsed is not None and parsed.progress() == pick
    assert parse_worker_page(text, pick.name + "-absent") is None


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["rollout", "update", "done"]), counts, counts,
       st.floats(0, 64, allow_nan=False), counts, counts)
def test_controller_page_round_trips(phase, step, pending, acceptance, policy, drafter):
    registry = CollectorRegistry()
    Gauge("tlt_controller_step", "h", registry=registry).set(step)
    gauge = Gauge("tlt_controller_phase", "h", ["phase"], registry=registry)
    for p in ("rollout", "update", "done"):
        gauge.labels(p).set(1 if p == phase else 0)
    Gauge("tlt_controller_pending_requests", "h", registry=registry).set(pending)
    Gauge("tlt_controller_acceptance_length", "h", registry=registry).set(acceptance)
    Gauge("tlt_controller_policy_version", "h", registry=registry).set(policy)
    Gauge("tlt_controller_drafter_version", "h", registry=registry).set(drafter)
    parsed = parse_controller_page(generate_latest(registry).decode())
    assert parsed is not None
    assert parsed.phase == {"done": "idle"}.get(phase, phase)  # the planner calls "done" idle
    assert (parsed.step, parsed.pending_requests, parsed.policy_version, parsed.drafter_version) == (
        step, pending, policy, drafter)
    assert parsed.acceptance_length == acceptance


@given(st.text(max_size=200))
def test_garbage_is_unknown_not_an_error(text):
    assert parse_worker_page(text, "w") is None or parse_worker_page(text, "w").name == "w"
    parse_controller_page(text)  # never raises


def test_pages_without_the_series_are_unknown():
    assert parse_worker_page("# nothing here\n", "w") is None
    assert parse_controller_page('tlt_rollout_requests_running{worker="w"} 1\n') is None
    assert parse_worker_page("this is { not prometheus", "w") is None


# ---- the Prometheus-API source -------------------------------------------------------------------------


def _vector(series):
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels, "value": [1700000000.0 + ts, str(value)]} for labels, value, ts in series]}}


class _FakePrometheus(BaseHTTPRequestHandler):
    queries: ClassVar[list[str]] = []

    def do_GET(self):
        query = parse_qs(urlsplit(self.path).query)["query"][0]
        type(self).queries.append(query)
        if "tlt_rollout_" in query:
            series = [({"__name__": "tlt_rollout_requests_running", "worker": "j-rollout-0", "pod": "j-rollout-0",
                        "namespace": "ns"}, 0, 0),
                      ({"__name__": "tlt_rollout_requests_queued", "worker": "j-rollout-0"}, 0, 0),
                      ({"__name__": "tlt_rollout_buffered_responses", "worker": "j-rollout-0"}, 9, 0),
                      ({"__name__": "tlt_rollout_requests_finished_total", "worker": "j-rollout-0"}, 9, 0),
                      ({"__name__": "tlt_rollout_requests_running", "worker": "j-rollout-1"}, 3, 0)]
        else:
            series = [({"__name__": "tlt_controller_phase", "phase": "rollout", "pod": "j-controller-old"}, 0, 0),
                      ({"__name__": "tlt_controller_phase", "phase": "update", "pod": "j-controller-old"}, 1, 0),
                      ({"__name__": "tlt_controller_phase", "phase": "rollout", "pod": "j-controller-new"}, 1, 5),
                      ({"__name__": "tlt_controller_pending_requests", "pod": "j-controller-new"}, 0, 5),
                      ({"__name__": "tlt_controller_step", "pod": "j-controller-new"}, 7, 5)]
        body = json.dumps(_vector(series)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_prometheus_source_reads_the_same_progress():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        async def read():
            async with aiohttp.ClientSession() as session:
                source = PrometheusSource(session, f"http://127.0.0.1:{server.server_port}/")
                return await source.read("ns", "j", None, [Target("j-rollout-0", None), Target("j-rollout-1", None),
                                                           Target("j-rollout-2", None)])
        snapshot = asyncio.run(read())
    finally:
        server.shutdown()
        server.server_close()
    assert any('worker=~"j-rollout-[0-9]+"' in q and 'namespace="ns"' in q for q in _FakePrometheus.queries)
    assert any('pod=~"j-controller-.+"' in q for q in _FakePrometheus.queries)
    # the newest controller pod wins; pod 2 has no series: unknown
    assert snapshot.controller is not None and snapshot.controller.phase == "rollout"
    assert snapshot.controller.step == 7
    assert snapshot.workers["j-rollout-0"].progress() == WorkerProgress("j-rollout-0", 0, 0, 9, 9)
    assert snapshot.workers["j-rollout-1"].running == 3
    assert snapshot.workers["j-rollout-2"] is None
    progress = snapshot.progress()
    assert [w.healthy for w in progress.workers] == [True, True, False]


def test_unreachable_prometheus_means_no_plan():
    async def read():
        async with aiohttp.ClientSession() as session:
            source = PrometheusSource(session, "http://127.0.0.1:9", timeout=0.5)
            return await source.read("ns", "j", None, [Target("j-rollout-0", None)])
    snapshot = asyncio.run(read())
    assert snapshot.controller is None and snapshot.progress() is None
