"""Rollout progress for the planner, read from the pods' Prometheus metrics.

Two sources, one result (:class:`Snapshot` -> :class:`~tlt_operator.planner.JobProgress`):

* :class:`ScrapeSource` (default): GET ``http://<pod-ip>:8080/metrics`` of every rollout pod and of the
  controller pod, concurrently, with a short timeout.
* :class:`PrometheusSource` (when ``TLT_PROMETHEUS_URL`` is set): one instant query per kind of pod against
  the Prometheus HTTP API. Rollout series are matched by their ``worker`` label (= the pod name), the
  controller's by the ``pod`` label; both also by the ``namespace`` label (label names configurable).
  Prometheus lags by a scrape interval, so role moves do too.

A pod that does not answer, answers garbage, or has no series counts as *unknown*: the planner sees it as
unhealthy and the operator leaves its role alone. Without the controller's metrics there is no phase and
no pending count, so there is no plan at all (:meth:`Snapshot.progress` returns None).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tlt_operator.planner import JobProgress, Phase, WorkerProgress

# Series names as they appear in a scrape (counters with their _total suffix).
ROLLOUT_RUNNING = "tlt_rollout_requests_running"
ROLLOUT_QUEUED = "tlt_rollout_requests_queued"
ROLLOUT_FINISHED = "tlt_rollout_requests_finished_total"
ROLLOUT_BUFFERED = "tlt_rollout_buffered_responses"
ROLLOUT_ROLE = "tlt_rollout_role"
ROLLOUT_DRAFTS = "tlt_rollout_spec_decode_num_drafts_total"
ROLLOUT_ACCEPTED = "tlt_rollout_spec_decode_num_accepted_tokens_total"
ROLLOUT_POLICY_VERSION = "tlt_rollout_policy_version"
ROLLOUT_DRAFTER_VERSION = "tlt_rollout_drafter_version"
CONTROLLER_STEP = "tlt_controller_step"
CONTROLLER_PHASE = "tlt_controller_phase"
CONTROLLER_PENDING = "tlt_controller_pending_requests"
CONTROLLER_ACCEPTANCE = "tlt_controller_acceptance_length"
CONTROLLER_POLICY_VERSION = "tlt_controller_policy_version"
CONTROLLER_DRAFTER_VERSION = "tlt_controller_drafter_version"

ROLLOUT_SERIES = (ROLLOUT_RUNNING, ROLLOUT_QUEUED, ROLLOUT_FINISHED, ROLLOUT_BUFFERED, ROLLOUT_ROLE, ROLLOUT_DRAFTS,
                  ROLLOUT_ACCEPTED, ROLLOUT_POLICY_VERSION, ROLLOUT_DRAFTER_VERSION)
CONTROLLER_SERIES = (CONTROLLER_STEP, CONTROLLER_PHASE, CONTROLLER_PENDING, CONTROLLER_ACCEPTANCE,
                     CONTROLLER_POLICY_VERSION, CONTROLLER_DRAFTER_VERSION)
# The controller exports done; the planner calls the same state idle.
_PHASES: dict[str, Phase] = {"rollout": "rollout", "update": "update", "done": "idle", "idle": "idle"}

DEFAULT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class WorkerMetrics:
    """What one rollout pod's /metrics says."""

    name: str
    running: int
    queued: int
    finished: int
    buffered_responses: int
    role: str | None = None
    policy_version: int | None = None
    drafter_version: int | None = None
    num_drafts: float = 0.0
    accepted_tokens: float = 0.0

    def progress(self) -> WorkerProgress:
        return WorkerProgress(self.name, self.running, self.queued, self.finished, self.buffered_responses)


@dataclass(frozen=True)
class ControllerMetrics:
    """What the controller pod's /metrics says."""

    step: int
    phase: Phase
    pending_requests: int
    acceptance_length: float | None = None
    policy_version: int | None = None
    drafter_version: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """One reading: the controller (None = unknown) and every rollout pod (None = unknown)."""

    controller: ControllerMetrics | None
    workers: Mapping[str, WorkerMetrics | None]

    def progress(self) -> JobProgress | None:
        """The planner's input; unknown pods are unhealthy workers. None without the controller."""
        if self.controller is None:
            return None
        workers = tuple(
            m.progress() if m is not None else WorkerProgress(name, 0, 0, 0, 0, healthy=False)
            for name, m in sorted(self.workers.items()))
        return JobProgress(self.controller.phase, self.controller.pending_requests, workers)


@dataclass(frozen=True)
class Target:
    """A pod to read: its name and where its metrics are served."""

    name: str
    host: str | None
    port: int = 8080

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"


# ---- parsing ----------------------------------------------------------------------------------------


def parse_text(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition page (raises ValueError on a malformed page)."""
    return [Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _count(value: float | None) -> int:
    return max(0, round(_finite(value))) if value is not None else 0


def _version(value: float | None) -> int | None:
    return round(value) if value is not None and math.isfinite(value) else None


def _value(samples: Iterable[Sample], name: str) -> float | None:
    for s in samples:
        if s.name == name:
            return s.value
    return None


def _one_hot(samples: Iterable[Sample], name: str, label: str) -> str | None:
    best = None
    for s in samples:
        if s.name == name and s.value >= 0.5 and label in s.labels:
            best = s.labels[label]
    return best


def worker_metrics(samples: Sequence[Sample], name: str) -> WorkerMetrics | None:
    """The rollout worker ``name``'s metrics from a page (None when it has no rollout series).

    Series are matched by their ``worker`` label; a page that names exactly one other worker is accepted
    for ``name`` (the pod serves only itself).
    """
    rollout = [s for s in samples if s.name.startswith("tlt_rollout_")]
    if not rollout:
        return None
    workers = {s.labels.get("worker") for s in rollout}
    if name in workers:
        mine = [s for s in rollout if s.labels.get("worker") == name]
    elif len(workers) == 1:
        mine = rollout
    else:
        return None
    running = _value(mine, ROLLOUT_RUNNING)
    if running is None:
        return None
    return WorkerMetrics(
        name=name,
        running=_count(running),
        queued=_count(_value(mine, ROLLOUT_QUEUED)),
        finished=_count(_value(mine, ROLLOUT_FINISHED)),
        buffered_responses=_count(_value(mine, ROLLOUT_BUFFERED)),
        role=_one_hot(mine, ROLLOUT_ROLE, "role"),
        policy_version=_version(_value(mine, ROLLOUT_POLICY_VERSION)),
        drafter_version=_version(_value(mine, ROLLOUT_DRAFTER_VERSION)),
        num_drafts=_finite(_value(mine, ROLLOUT_DRAFTS) or 0.0),
        accepted_tokens=_finite(_value(mine, ROLLOUT_ACCEPTED) or 0.0),
    )


def controller_metrics(samples: Sequence[Sample]) -> ControllerMetrics | None:
    """The controller's metrics from a page (None when it has no phase series)."""
    phase = _one_hot(samples, CONTROLLER_PHASE, "phase")
    if phase is None and not any(s.name == CONTROLLER_PHASE for s in samples):
        return None
    acceptance = _value(samples, CONTROLLER_ACCEPTANCE)
    return ControllerMetrics(
        step=_count(_value(samples, CONTROLLER_STEP)),
        phase=_PHASES.get(phase or "idle", "idle"),
        pending_requests=_count(_value(samples, CONTROLLER_PENDING)),
        acceptance_length=acceptance if acceptance is not None and math.isfinite(acceptance) else None,
        policy_version=_version(_value(samples, CONTROLLER_POLICY_VERSION)),
        drafter_version=_version(_value(samples, CONTROLLER_DRAFTER_VERSION)),
    )


def parse_worker_page(text: str, name: str) -> WorkerMetrics | None:
    try:
        return worker_metrics(parse_text(text), name)
    except (ValueError, TypeError, IndexError):
        return None


def parse_controller_page(text: str) -> ControllerMetrics | None:
    try:
        return controller_metrics(parse_text(text))
    except (ValueError, TypeError, IndexError):
        return None


# ---- sources ----------------------------------------------------------------------------------------


async def fetch_text(session: aiohttp.ClientSession, url: str, timeout: float = DEFAULT_TIMEOUT_S,
                     params: Sequence[tuple[str, str]] = ()) -> str | None:
    """The body of a GET, or None on any failure (refused, timeout, non-200, undecodable)."""
    try:
        async with session.get(url, params=list(params), timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
            if reply.status != 200:
                return None
            return await reply.text()
    except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError, ValueError):
        return None


class ScrapeSource:
    """Reads each pod's /metrics directly."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.session = session
        self.timeout = timeout

    async def _page(self, target: Target | None, series: Sequence[str]) -> str | None:
        if target is None or not target.host:
            return None
        # The TLT metrics server honours ?name[]=... (only these series); others ignore it.
        return await fetch_text(self.session, target.url, self.timeout, [("name[]", s) for s in series])

    async def read(self, namespace: str, job: str, controller: Target | None,
                   workers: Sequence[Target]) -> Snapshot:
        pages = await asyncio.gather(self._page(controller, CONTROLLER_SERIES),
                                     *(self._page(w, ROLLOUT_SERIES) for w in workers))
        ctrl = parse_controller_page(pages[0]) if pages[0] is not None else None
        found = {w.name: parse_worker_page(text, w.name) if text is not None else None
                 for w, text in zip(workers, pages[1:])}
        return Snapshot(ctrl, found)


class PrometheusSource:
    """Reads the same series from a Prometheus server's HTTP API (``/api/v1/query``)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, timeout: float = 2.0,
                 namespace_label: str = "namespace", pod_label: str = "pod") -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.namespace_label = namespace_label
        self.pod_label = pod_label

    def queries(self, namespace: str, job: str) -> tuple[str, str]:
        ns = f',{self.namespace_label}="{namespace}"' if self.namespace_label else ""
        rollout = f'{{__name__=~"tlt_rollout_.+",worker=~"{job}-rollout-[0-9]+"{ns}}}'
        controller = f'{{__name__=~"tlt_controller_.+",{self.pod_label}=~"{job}-controller-.+"{ns}}}'
        return rollout, controller

    async def _query(self, query: str) -> list[dict[str, Any]] | None:
        text = await fetch_text(self.session, f"{self.url}/api/v1/query", self.timeout, [("query", query)])
        if text is None:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if data.get("status") != "success" or (data.get("data") or {}).get("resultType") != "vector":
            return None
        return list(data["data"].get("result") or [])

    @staticmethod
    def _samples(series: Iterable[dict[str, Any]]) -> list[tuple[float, Sample]]:
        out = []
        for s in series:
            labels = dict(s.get("metric") or {})
            name = labels.pop("__name__", "")
            try:
                ts, value = s["value"]
                out.append((float(ts), Sample(name, labels, float(value))))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    async def read(self, namespace: str, job: str, controller: Target | None,
                   workers: Sequence[Target]) -> Snapshot:
        rollout_q, controller_q = self.queries(namespace, job)
        rollout_series, controller_series = await asyncio.gather(self._query(rollout_q), self._query(controller_q))
        ctrl = None
        if controller_series:
            samples = self._samples(controller_series)
            by_pod: dict[str, list[tuple[float, Sample]]] = {}
            for ts, s in samples:
                by_pod.setdefault(s.labels.get(self.pod_label, ""), []).append((ts, s))
            # The controller pod we were given, else the one with the newest samples.
            pod = controller.name if controller is not None and controller.name in by_pod else \
                max(by_pod, key=lambda p: max(ts for ts, _ in by_pod[p]))
            ctrl = controller_metrics([s for _, s in by_pod[pod]])
        samples = [s for _, s in self._samples(rollout_series or [])]
        found: dict[str, WorkerMetrics | None] = {}
        for w in workers:
            mine = [s for s in samples if s.labels.get("worker") == w.name]
            found[w.name] = worker_metrics(mine, w.name) if mine else None
        return Snapshot(ctrl, found)
