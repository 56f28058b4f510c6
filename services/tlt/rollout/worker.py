"""A rollout worker: one engine with the current policy and drafter, a pull-based request loop, and the
drafter role for the long tail. The controller talks to it through the :class:`RolloutWorker` methods
only, so a gRPC adapter can stand in for it.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tlt.config import JobSpec
from tlt.drafter.spot import SpotDrafterTrainer, SpotReport
from tlt.models.drafter import Eagle3Drafter
from tlt.models.drafter_io import copy_drafter_tensors
from tlt.models.loader import load_state_dict_from_hf
from tlt.models.transformer import CausalLM
from tlt.rollout.engine import RequestOutput, RolloutEngine
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.tuner import BegMabTuner, SpecStrategy, TunerConfig
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

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def make_tuner(spec: JobSpec) -> BegMabTuner | None:
    """The tuner for the configured speculative mode (None when SD is off)."""
    sd = spec.rollout.speculative
    if sd.mode == "off":
        return None
    if sd.mode == "always":
        config = TunerConfig(sd_batch_threshold=10**6, strategies=[SpecStrategy.parse(sd.strategy)],
                             allow_sd_off_arm=False, seed=spec.seed)
    else:
        config = TunerConfig(sd_batch_threshold=sd.sd_batch_threshold,
                             strategies=[SpecStrategy.parse(s) for s in sd.strategies], seed=spec.seed)
    return BegMabTuner(config)


@dataclass
class RoleSpan:
    """The worker held ``role`` (or was idle) from ``start`` to ``end`` (monotonic seconds)."""

    start: float
    end: float
    role: str


class RolloutWorker:
    """An in-process rollout worker. ``model`` is this worker's own policy copy; ``drafter`` (optional) its
    inference drafter, bound to ``model``'s embedding."""

    def __init__(self, name: str, model: CausalLM, spec: JobSpec, drafter: Eagle3Drafter | None,
                 push_delta: Callable[[str, dict[str, torch.Tensor], int], None] | None = None) -> None:
        self.name = name
        self.model = model
        self.spec = spec
        tuner = make_tuner(spec) if drafter is not None else None
        self.engine = RolloutEngine(model, max_running=spec.rollout.max_running, seed=spec.seed,
                                    drafter=drafter if tuner is not None else None, tuner=tuner)
        self.drafter = self.engine.spec.drafter if self.engine.spec else None
        self.policy_version = -1
        self.drafter_version = -1
        d = spec.drafter
        self.spot: SpotDrafterTrainer | None = None
        if self.drafter is not None and d.online_training and push_delta is not None:
            self.spot = SpotDrafterTrainer(
                model, self.drafter, lambda delta, tokens: push_delta(name, delta, tokens), lr=d.lr,
                batch_size=d.batch_size, push_every=d.push_every, ttt_steps=d.ttt_steps,
                buffer_responses=d.buffer_responses, seed=spec.seed + zlib.crc32(name.encode()) % 10_000)
        self._role: Role = ROLLOUT
        self._wake = threading.Event()
        self.spot_reports: list[SpotReport] = []
        self.spans: list[RoleSpan] = []

    # ---- control (what the planner / controller call) ------------------------------------------

    def load_policy(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a published policy (HF names) into this worker's model in place."""
        load_state_dict_from_hf(self.model, tensors, f"policy v{version}")
        self.policy_version = version

    def load_drafter(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a published EAGLE-3 drafter into the engine's drafter in place."""
        if self.drafter is None:
            return
        copy_drafter_tensors(self.drafter, tensors, f"drafter v{version}")
        self.drafter_version = version

    def set_role(self, role: Role) -> None:
        self._role = role
        self._wake.set()

    @property
    def role(self) -> Role:
        return self._role

    def progress(self) -> WorkerProgress:
        snap = self.engine.progress()
        buffered = len(self.spot.buffer) if self.spot else 0
        return WorkerProgress(self.name, snap.running, snap.queued, snap.finished, buffered)

    # ---- the step loop (run in the worker's own thread) ----------------------------------------

    def run_rollout(self, queue: RequestQueue, on_result: Callable[[RolloutRequest, RequestOutput], None],
                    step_over: threading.Event, start_drafter_from: Callable[[], tuple[int, dict]] | None = None
                    ) -> None:
        """Take requests while slots are free, decode, report results; in the drafter role (and only when
        the engine is empty) train the drafter until the role or the step ends."""
        taken: dict[str, RolloutRequest] = {}
        self.spans = []
        if self.spot is not None:
            self.spot.clear_buffer()
        span_start, span_role = time.monotonic(), "rollout"

        def mark(role: str) -> None:
            nonlocal span_start, span_role
            if role != span_role:
                now = time.monotonic()
                self.spans.append(RoleSpan(span_start, now, span_role))
                span_start, span_role = now, role

        while not step_over.is_set():
            if self._role == DRAFTER and self.spot is not None and not self.engine.has_work():
                mark("drafter")
                if start_drafter_from is not None:
                    self.spot.start_from(start_drafter_from()[1])
                report = self.spot.train(lambda: self._role != DRAFTER or step_over.is_set())
                self.spot_reports.append(report)
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
        mark("end")
