"""A rollout worker: one engine with the current policy and drafter, a pull-based request loop, and the
drafter role for the long tail. The controller talks to it through the :class:`RolloutWorker` methods
only, so a gRPC adapter can stand in for it.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest

import torch

from tlt import metrics as m
from tlt.config import JobSpec
from tlt.drafter.aggregator import trainable_state
from tlt.drafter.spot import SpotDrafterTrainer, SpotReport
from tlt.models.drafter import Eagle3Drafter
from tlt.models.drafter_io import copy_drafter_tensors
from tlt.models.loader import load_state_dict_from_hf
from tlt.models.transformer import CausalLM
from tlt.rollout.engine import RequestOutput, RolloutEngine
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.speculative import SpecDecodeStats
from tlt.rollout.tuner import BegMabTuner, SpecStrategy, TunerConfig
from tlt.store import ArtifactStore, VersionNotFoundError
from tlt.store.kinds import DRAFTER_KIND, POLICY_KIND
from tlt_operator.planner import DRAFTER, ROLLOUT, Role, WorkerProgress


@dataclass(frozen=True)
class RolloutRequest:
    """One response to generate: ``request_id`` is unique in the job, ``group`` is its GRPO group."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    group: int


class RequestQueue:
    """The controller's queue of requests not yet taken by a worker (thread-safe, pull-based)."""

    def __init__(self, requests: list[RolloutRequest] | None = None, workers: int = 1) -> None:
        self._items: deque[RolloutRequest] = deque(requests or [])
        self._lock = threading.Lock()
        # a worker keeps at most its fair share in flight, so one fast puller cannot take the whole batch
        self.fair_share = max(1, -(-len(self._items) // max(1, workers)))

    def take(self, n: int) -> list[RolloutRequest]:
        with self._lock:
            return [self._items.popleft() for _ in range(min(n, len(self._items)))]

    def put_back(self, requests: list[RolloutRequest]) -> None:
        with self._lock:
            self._items.extendleft(reversed(requests))

    def extend(self, requests: list[RolloutRequest]) -> None:
        with self._lock:
            self._items.extend(requests)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def make_tuner(spec: JobSpec, device_type: str) -> BegMabTuner | None:
    """The tuner for the configured speculative mode (None when SD is off), for a target on
    ``device_type`` (which picks an unset ``sd_batch_threshold``)."""
    sd = spec.rollout.speculative
    if sd.mode == "off":
        return None
    if sd.mode == "always":
        config = TunerConfig(sd_batch_threshold=10**6, strategies=[SpecStrategy.parse(sd.strategy)],
                             allow_sd_off_arm=False, seed=spec.seed)
    else:
        config = TunerConfig(sd_batch_threshold=sd.threshold_on(device_type),
                             strategies=[SpecStrategy.parse(s) for s in sd.strategies], seed=spec.seed)
    return BegMabTuner(config)


@dataclass
class RoleSpan:
    """The worker held ``role`` (or was idle) from ``start`` to ``end`` (seconds since the step began)."""

    start: float
    end: float
    role: str


@dataclass
class WorkerStepSummary:
    """What one worker did in one rollout step (returned by :meth:`RolloutWorker.run_rollout`)."""

    worker: str
    spans: list[RoleSpan]
    stats: SpecDecodeStats
    drafter: list[SpotReport]
    policy_version: int
    drafter_version: int


def add_stats(total: SpecDecodeStats, part: SpecDecodeStats) -> SpecDecodeStats:
    """``total + part`` field by field (per-position counts aligned from position 0)."""
    per_pos = [a + b for a, b in zip_longest(total.accepted_per_position, part.accepted_per_position, fillvalue=0)]
    return SpecDecodeStats(
        num_drafts=total.num_drafts + part.num_drafts, num_draft_tokens=total.num_draft_tokens + part.num_draft_tokens,
        num_accepted_tokens=total.num_accepted_tokens + part.num_accepted_tokens, accepted_per_position=per_pos,
        sd_seconds=total.sd_seconds + part.sd_seconds, plain_seconds=total.plain_seconds + part.plain_seconds,
        sd_iterations=total.sd_iterations + part.sd_iterations,
        plain_iterations=total.plain_iterations + part.plain_iterations,
        sd_iterations_by_bucket=_add_counts(total.sd_iterations_by_bucket, part.sd_iterations_by_bucket),
        plain_iterations_by_bucket=_add_counts(total.plain_iterations_by_bucket, part.plain_iterations_by_bucket))


def _add_counts(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def bucket_labels(bounds: Sequence[int]) -> dict[int, str]:
    """Label of each batch-size bucket by its lower bound: ``[1, 2, 3, 5]`` -> ``1``, ``2``, ``3-4``, ``5+``."""
    return {low: f"{low}+" if nxt is None else str(low) if nxt == low + 1 else f"{low}-{nxt - 1}"
            for low, nxt in zip(bounds, [*bounds[1:], None], strict=False)}


def sum_reports(reports: list[SpotReport]) -> SpotReport:
    """One report for several drafter-role stints (the last known loss, preempted if any stint was)."""
    losses = [r.last_loss for r in reports if r.last_loss is not None]
    return SpotReport(steps=sum(r.steps for r in reports), tokens=sum(r.tokens for r in reports),
                      pushes=sum(r.pushes for r in reports), seconds=sum(r.seconds for r in reports),
                      last_loss=losses[-1] if losses else None, preempted=any(r.preempted for r in reports),
                      failed_pushes=sum(r.failed_pushes for r in reports))


class RolloutWorker:
    """A rollout worker: ``model`` is this worker's own policy copy; ``drafter`` (optional) its inference
    drafter, bound to ``model``'s embedding. Policy and drafter versions are read from ``store``.

    ``push_delta(worker, delta, tokens, base_version)`` hands drafter-training work to the aggregator (in
    process or over gRPC), with the drafter version the stint started from; ``drafter_base()`` gives the
    (version, trainable weights) a drafter-role stint starts from (default: the newest drafter version in
    the store).
    """

    def __init__(self, name: str, model: CausalLM, spec: JobSpec, drafter: Eagle3Drafter | None,
                 store: ArtifactStore,
                 push_delta: Callable[[str, dict[str, torch.Tensor], int, int], None] | None = None,
                 drafter_base: Callable[[], tuple[int, dict[str, torch.Tensor]]] | None = None) -> None:
        self.name = name
        self.model = model
        self.spec = spec
        self.store = store
        tuner = make_tuner(spec, model.device.type) if drafter is not None else None
        self.engine = RolloutEngine(model, max_running=spec.rollout.max_running, seed=spec.seed,
                                    drafter=drafter if tuner is not None else None, tuner=tuner,
                                    compile=spec.rollout.compile)
        if spec.rollout.compile:  # compile now, not in the first rollout step (graphs do not depend on weights)
            self.engine.warm_up(list(range(1, min(9, model.config.vocab_size))))
        self.drafter = self.engine.spec.drafter if self.engine.spec else None
        self.policy_version = -1
        self.drafter_version = -1
        d = spec.drafter
        self.spot: SpotDrafterTrainer | None = None
        self._stint_base_version = 0  # the drafter version the current drafter-role stint started from
        if self.drafter is not None and d.online_training and push_delta is not None:
            self.spot = SpotDrafterTrainer(
                model, self.drafter,
                lambda delta, tokens: push_delta(name, delta, tokens, self._stint_base_version), lr=d.lr,
                batch_size=d.batch_size, push_every=d.push_every, ttt_steps=d.ttt_steps,
                buffer_responses=d.buffer_responses, seed=spec.seed + zlib.crc32(name.encode()) % 10_000)
        self._drafter_base = drafter_base or self._newest_drafter_in_store
        self._role: Role = ROLLOUT
        self._wake = threading.Event()
        self._totals = SpecDecodeStats()  # finished steps; the running step's counters live in engine.stats
        self._drafter_total: list[SpotReport] = []
        self.activity = m.Stopwatch("idle")

    # ---- control (what the planner / controller call) ------------------------------------------

    def load_policy(self, version: int = -1) -> bool:
        """Load policy ``version`` (-1: the newest) from the store into the model in place; False if held."""
        version = self._resolve(POLICY_KIND, version)
        if version == self.policy_version:
            return False
        load_state_dict_from_hf(self.model, self.store.load_tensors(POLICY_KIND, version), f"policy v{version}")
        self.policy_version = version
        return True

    def load_drafter(self, version: int = -1) -> bool:
        """Load drafter ``version`` (-1: the newest) from the store into the engine's drafter in place."""
        if self.drafter is None:
            return False
        version = self._resolve(DRAFTER_KIND, version)
        if version == self.drafter_version:
            return False
        copy_drafter_tensors(self.drafter, self.store.load_tensors(DRAFTER_KIND, version), f"drafter v{version}")
        self.drafter_version = version
        return True

    def _resolve(self, kind: str, version: int) -> int:
        if version >= 0:
            return version
        latest = self.store.latest(kind)
        if latest is None:
            raise VersionNotFoundError(f"no {kind} version in store {self.store}; publish one first")
        return latest.version

    def _newest_drafter_in_store(self) -> tuple[int, dict[str, torch.Tensor]]:
        version = self._resolve(DRAFTER_KIND, -1)
        base = self.drafter.copy_for(self.model).float()
        copy_drafter_tensors(base, self.store.load_tensors(DRAFTER_KIND, version), f"drafter v{version}")
        return version, trainable_state(base)

    def set_role(self, role: Role) -> Role:
        """Move the worker to ``role``; returns the previous role."""
        previous, self._role = self._role, role
        self._wake.set()
        return previous

    def wake(self) -> None:
        self._wake.set()

    @property
    def role(self) -> Role:
        return self._role

    @property
    def speculative(self) -> bool:
        return self.engine.spec is not None

    def progress(self) -> WorkerProgress:
        snap = self.engine.progress()
        buffered = len(self.spot.buffer) if self.spot else 0
        return WorkerProgress(self.name, snap.running, snap.queued, snap.finished, buffered)

    def live_stats(self) -> SpecDecodeStats:
        """Speculative-decoding counters of the step in progress."""
        return self.engine.stats

    def tuner_state(self) -> dict | None:
        return self.engine.tuner.export_state() if self.engine.tuner is not None else None

    def load_tuner_state(self, state: dict | None) -> None:
        if self.engine.tuner is not None and state:
            self.engine.tuner.load_state(state)

    def drafter_training_total(self) -> SpotReport:
        return sum_reports(self._drafter_total)

    # ---- the step loop (run in the worker's own thread) ----------------------------------------

    def run_rollout(self, queue: RequestQueue, on_result: Callable[[RolloutRequest, RequestOutput], None],
                    step_over: threading.Event) -> WorkerStepSummary:
        """Take requests while slots are free, decode, report results; in the drafter role (and only when
        nothing is decoding or waiting in ``queue``) train the drafter until the role or the step ends or a
        request arrives: work comes first, whatever the role (a request re-dispatched from a failed worker is
        decoded at once, not after the stint). Requests still in the engine when ``step_over`` is set (an
        aborted step) are dropped."""
        self._totals = add_stats(self._totals, self.engine.stats)
        self.engine.stats.__init__()
        taken: dict[str, RolloutRequest] = {}
        spans: list[RoleSpan] = []
        reports: list[SpotReport] = []
        if self.spot is not None:
            self.spot.clear_buffer()
        start = time.monotonic()
        span_start, span_role = start, "rollout"

        def mark(role: str) -> None:
            nonlocal span_start, span_role
            if role != span_role:
                now = time.monotonic()
                spans.append(RoleSpan(span_start - start, now - start, span_role))
                span_start, span_role = now, role
                self.activity.switch(role if role != "end" else "idle")

        self.activity.switch("rollout")
        try:
            while not step_over.is_set():
                if (self._role == DRAFTER and self.spot is not None and self.spot.buffer
                        and not self.engine.has_work() and not len(queue)):
                    mark("drafter")
                    self._stint_base_version, base = self._drafter_base()
                    self.spot.start_from(base)
                    report = self.spot.train(lambda: self._role != DRAFTER or step_over.is_set() or len(queue) > 0)
                    reports.append(report)
                    self._drafter_total.append(report)
                    continue
                free = min(self.engine.max_running, queue.fair_share) - len(taken)
                for request in queue.take(free) if free > 0 else []:
                    taken[request.request_id] = request
                    self.engine.submit(request.prompt_ids, request.params, request_id=request.request_id)
                if self.engine.has_work():
                    mark("rollout")
                    for out in self.engine.step():
                        request = taken.pop(out.request_id)
                        if self.spot is not None:
                            self.spot.add_response(out.prompt_ids, out.token_ids)
                        on_result(request, out)
                else:
                    mark("idle")
                    self._wake.wait(0.01)
                    self._wake.clear()
        finally:
            mark("end")
            self.engine.abort_all()
        return WorkerStepSummary(self.name, spans, self.engine.stats, reports, self.policy_version,
                                 self.drafter_version)

    # ---- metrics ----------------------------------------------------------------------------------

    def metric_samples(self) -> list[m.Sample]:
        """This worker's series for :class:`tlt.metrics.CallbackCollector` (read at scrape time)."""
        w = {"worker": self.name}
        snap = self.engine.progress()
        stats = add_stats(self._totals, self.engine.stats)
        spot = self.drafter_training_total()
        out: list[m.Sample] = [
            (m.ROLLOUT_REQUESTS_RUNNING, w, snap.running), (m.ROLLOUT_REQUESTS_QUEUED, w, snap.queued),
            (m.ROLLOUT_REQUESTS_FINISHED, w, snap.finished), (m.ROLLOUT_GENERATED_TOKENS, w, snap.generated_tokens),
            (m.ROLLOUT_BUFFERED_RESPONSES, w, len(self.spot.buffer) if self.spot else 0),
            (m.ROLLOUT_POLICY_VERSION, w, self.policy_version), (m.ROLLOUT_DRAFTER_VERSION, w, self.drafter_version),
            *m.one_hot(m.ROLLOUT_ROLE, self._role, (ROLLOUT, DRAFTER), **w),
            *[(m.ROLLOUT_ROLE_SECONDS, {**w, "role": r}, s) for r, s in self.activity.totals().items()],
            (m.ROLLOUT_SPEC_DECODE_NUM_DRAFTS, w, stats.num_drafts),
            (m.ROLLOUT_SPEC_DECODE_NUM_DRAFT_TOKENS, w, stats.num_draft_tokens),
            (m.ROLLOUT_SPEC_DECODE_NUM_ACCEPTED_TOKENS, w, stats.num_accepted_tokens),
            *[(m.ROLLOUT_SPEC_DECODE_ACCEPTED_PER_POS, {**w, "position": str(i)}, n)
              for i, n in enumerate(stats.accepted_per_position)],
            (m.ROLLOUT_DECODE_SECONDS, {**w, "sd": "on"}, stats.sd_seconds),
            (m.ROLLOUT_DECODE_SECONDS, {**w, "sd": "off"}, stats.plain_seconds),
            (m.ROLLOUT_DECODE_ITERATIONS, {**w, "sd": "on"}, stats.sd_iterations),
            (m.ROLLOUT_DECODE_ITERATIONS, {**w, "sd": "off"}, stats.plain_iterations),
            *self._batch_iteration_samples(stats),
            (m.ROLLOUT_DRAFTER_TRAIN_STEPS, w, spot.steps), (m.ROLLOUT_DRAFTER_TRAIN_TOKENS, w, spot.tokens),
            (m.ROLLOUT_DRAFTER_PUSHES, w, spot.pushes), (m.ROLLOUT_DRAFTER_LOSS, w, spot.last_loss),
        ]
        return out

    def _batch_iteration_samples(self, stats: SpecDecodeStats) -> list[m.Sample]:
        """:data:`tlt.metrics.ROLLOUT_BATCH_DECODE_ITERATIONS` for every bucket of the engine, zeros included (a
        counter first seen above zero loses that first increase in ``rate()``)."""
        # an engine that counts no buckets (vLLM's) exports none
        labels = bucket_labels(getattr(self.engine, "bucket_bounds", ()))
        w = {"worker": self.name}
        return [(m.ROLLOUT_BATCH_DECODE_ITERATIONS, {**w, "sd": sd, "batch_size": label}, counts.get(bucket, 0))
                for sd, counts in (("on", stats.sd_iterations_by_bucket), ("off", stats.plain_iterations_by_bucket))
                for bucket, label in labels.items()]
