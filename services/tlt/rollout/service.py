"""The rollout worker over gRPC: :class:`RolloutServicer` serves a :class:`RolloutWorker`, and
:class:`RemoteRolloutWorker` is the controller's handle on one, with the same methods as the in-process
worker (so the controller runs the same logic either way)."""

from __future__ import annotations

import json
import queue as queue_mod
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from tlt import metrics as m
from tlt.errors import InvalidRequestError
from tlt.rollout.engine import RequestOutput
from tlt.rollout.speculative import SpecDecodeStats
from tlt.rollout.worker import (
    RequestQueue,
    RoleSpan,
    RolloutRequest,
    RolloutWorker,
    WorkerStepSummary,
    sum_reports,
)
from tlt.rpc import convert
from tlt.rpc.client import RemoteClient
from tlt.rpc.errors import ConflictError, RpcError, from_grpc
from tlt.rpc.server import ServicerBase, rpc_method
from tlt.rpc.tls import ClientTLS
from tlt.rpc.v1 import rollout_pb2, rollout_pb2_grpc
from tlt_operator.planner import ROLLOUT, Role, WorkerProgress

SERVICE_NAME = "tlt.v1.Rollout"
# A client may stream ahead of the worker's free slots; beyond this many unanswered requests per slot the
# server stops reading, so a flood of requests costs bounded memory.
IN_FLIGHT_PER_SLOT = 4
_DONE = object()


def request_from_proto(msg: rollout_pb2.GenerateRequest, worker: RolloutWorker) -> RolloutRequest:
    """A validated request (the worker's engine checks the prompt; SamplingParams checks the rest)."""
    if not msg.request_id:
        raise InvalidRequestError("GenerateRequest.request_id is empty; give every request a unique id")
    try:
        prompt = worker.engine.validate(msg.prompt_ids)
        params = convert.params_from_proto(msg.params)
    except (InvalidRequestError, ValueError) as exc:
        raise InvalidRequestError(f"request {msg.request_id}: {exc}") from None
    return RolloutRequest(msg.request_id, prompt, params, msg.group)


class RolloutServicer(ServicerBase, rollout_pb2_grpc.RolloutServicer):
    """Serves one worker. One Generate stream (a rollout step) at a time."""

    service_name = "rollout"

    def __init__(self, worker: RolloutWorker, registry) -> None:
        super().__init__(registry)
        self.worker = worker
        self._stream_lock = threading.Lock()
        self._streams: list[dict] = []  # the counts of every open stream (the lock lets one run; all are counted)
        registry.register(m.CallbackCollector(self.metric_samples))

    @property
    def unanswered_limit(self) -> int:
        """How many requests of a stream the service holds unanswered before it stops reading the stream."""
        return IN_FLIGHT_PER_SLOT * self.worker.engine.max_running

    def metric_samples(self) -> list[m.Sample]:
        """The service's own series (the worker exports its own)."""
        unanswered = sum(c["accepted"] - c["answered"] for c in list(self._streams))
        return [(m.ROLLOUT_REQUESTS_UNANSWERED, {"worker": self.worker.name}, unanswered)]

    @rpc_method
    def Generate(self, request_iterator, context) -> Iterator[rollout_pb2.GenerateEvent]:  # noqa: N802
        if not self._stream_lock.acquire(blocking=False):
            raise ConflictError(f"worker {self.worker.name} is already running a rollout step; "
                                "one Generate stream at a time")
        try:
            yield from self._generate(request_iterator, context)
        finally:
            self._stream_lock.release()

    def _generate(self, request_iterator, context) -> Iterator[rollout_pb2.GenerateEvent]:
        inbox = RequestQueue()
        inbox.fair_share = 1 << 30  # the client keeps at most the worker's free slots in flight
        step_over = threading.Event()
        events: queue_mod.Queue = queue_mod.Queue()
        worker = self.worker

        # answered = sent to the client, not merely finished: completions waiting in `events` for a client that
        # reads slowly count as unanswered, so the read loop's limit bounds `events` too
        counts = {"accepted": 0, "completed": 0, "answered": 0, "input_done": False}
        lock = threading.Condition()
        limit = self.unanswered_limit
        self._streams.append(counts)

        def finish_if_drained() -> None:
            with lock:
                lock.notify_all()
                if counts["input_done"] and counts["completed"] == counts["accepted"]:
                    step_over.set()
                    worker.wake()

        def read() -> None:
            seen: set[str] = set()
            try:
                for msg in request_iterator:
                    request = request_from_proto(msg, worker)
                    if request.request_id in seen:  # results are matched to requests by id
                        raise InvalidRequestError(f"request {request.request_id}: request_id is used twice in this "
                                                  "step; give every request a unique id")
                    seen.add(request.request_id)
                    with lock:
                        # backpressure: stop reading (HTTP/2 flow control then holds the client) while `limit`
                        # requests are unanswered (waiting, decoding, or finished but not yet sent)
                        while counts["accepted"] - counts["answered"] >= limit and not step_over.is_set():
                            lock.wait(0.1)
                        counts["accepted"] += 1
                    inbox.extend([request])
                    worker.wake()
                with lock:
                    counts["input_done"] = True
                finish_if_drained()
            except Exception as exc:  # a bad request, or the client went away: abort the step
                if context.is_active():
                    events.put(exc)
                step_over.set()
                worker.wake()

        def on_result(request: RolloutRequest, out: RequestOutput) -> None:
            events.put(rollout_pb2.GenerateEvent(completion=rollout_pb2.Completion(
                request_id=out.request_id, token_ids=out.token_ids, logprobs=out.logprobs,
                finish_reason=out.finish_reason, group=request.group)))
            with lock:
                counts["completed"] += 1
            finish_if_drained()

        def run() -> None:
            try:
                events.put(summary_to_proto(worker.run_rollout(inbox, on_result, step_over)))
            except Exception as exc:
                step_over.set()
                events.put(exc)
            finally:
                events.put(_DONE)

        threading.Thread(target=read, name=f"{worker.name}-read", daemon=True).start()
        runner = threading.Thread(target=run, name=f"{worker.name}-run", daemon=True)
        runner.start()
        error = None
        try:
            while (item := events.get()) is not _DONE:
                if isinstance(item, BaseException):
                    error = error or item
                    step_over.set()
                elif error is None:
                    yield item  # returns once gRPC has sent it and wants the next one
                    if item.HasField("completion"):
                        with lock:
                            counts["answered"] += 1
                            lock.notify_all()
        finally:
            # gRPC closes this generator mid-step when the client cancels: end the step and wait for it, so the
            # stream lock is only released once no step runs on the worker any more
            step_over.set()
            worker.wake()
            runner.join()
            self._streams.remove(counts)
        if error is not None:
            raise error

    @rpc_method
    def SetRole(self, request, context):  # noqa: N802
        role = convert.role_from_proto(request.role)
        previous = self.worker.set_role(role)
        return rollout_pb2.SetRoleResponse(role=request.role, previous=convert.ROLE_TO_PROTO[previous])

    @rpc_method
    def LoadPolicy(self, request, context):  # noqa: N802
        return self._load(self.worker.load_policy, request.version, lambda: self.worker.policy_version)

    @rpc_method
    def LoadDrafter(self, request, context):  # noqa: N802
        return self._load(self.worker.load_drafter, request.version, lambda: self.worker.drafter_version)

    @staticmethod
    def _load(load: Callable[[int], bool], version: int, current: Callable[[], int]):
        start = time.perf_counter()
        loaded = load(version)
        return rollout_pb2.LoadVersionResponse(version=current(), loaded=loaded,
                                               seconds=time.perf_counter() - start)

    @rpc_method
    def Progress(self, request, context):  # noqa: N802
        w = self.worker
        p = w.progress()
        return rollout_pb2.ProgressResponse(
            name=w.name, role=convert.ROLE_TO_PROTO[w.role], running=p.running, queued=p.queued,
            finished=p.finished, buffered_responses=p.buffered_responses, max_running=w.engine.max_running,
            policy_version=w.policy_version, drafter_version=w.drafter_version,
            stats=convert.stats_to_proto(w.live_stats()), speculative=w.speculative)

    @rpc_method
    def DrafterTraining(self, request, context):  # noqa: N802
        w = self.worker
        if request.HasField("load_tuner_state_json"):
            try:
                state = json.loads(request.load_tuner_state_json)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"load_tuner_state_json is not JSON: {exc}") from None
            except RecursionError:
                raise InvalidRequestError("load_tuner_state_json is nested too deeply") from None
            try:
                w.load_tuner_state(state)
            except OverflowError as exc:  # e.g. a negative word in state.rng, a reward over the float range
                raise InvalidRequestError(f"load_tuner_state_json holds a number out of range: {exc}") from None
        state = w.tuner_state()
        return rollout_pb2.DrafterTrainingResponse(
            tuner_state_json=json.dumps(state) if state is not None else "", online_training=w.spot is not None,
            total=convert.report_to_proto(w.drafter_training_total()))


def summary_to_proto(s: WorkerStepSummary) -> rollout_pb2.GenerateEvent:
    return rollout_pb2.GenerateEvent(summary=rollout_pb2.StepSummary(
        spans=[rollout_pb2.RoleSpan(start_s=x.start, end_s=x.end, role=x.role) for x in s.spans],
        stats=convert.stats_to_proto(s.stats), drafter=convert.report_to_proto(sum_reports(s.drafter)),
        policy_version=s.policy_version, drafter_version=s.drafter_version))


def summary_from_proto(worker: str, msg: rollout_pb2.StepSummary) -> WorkerStepSummary:
    reports = [convert.report_from_proto(msg.drafter)] if msg.drafter.steps or msg.drafter.pushes else []
    return WorkerStepSummary(worker, [RoleSpan(x.start_s, x.end_s, x.role) for x in msg.spans],
                             convert.stats_from_proto(msg.stats), reports, msg.policy_version, msg.drafter_version)


class RemoteRolloutWorker(RemoteClient):
    """The controller's handle on a rollout worker served at ``address`` (same methods as RolloutWorker).

    A Generate stream has no deadline (a step takes as long as its longest response), so a stall watchdog
    guards it instead: when the worker holds unanswered requests (or owes the step summary) and sends nothing
    for ``stall_timeout_s`` seconds (default ``default_stall_timeout_s``), the watchdog asks for its Progress;
    a worker still decoding (one long response) gets another period, one that does not answer or has not
    decoded since is cancelled and fails like a lost worker.
    """

    stub_class = rollout_pb2_grpc.RolloutStub
    peer = "rollout worker"
    default_timeout = 60.0
    default_stall_timeout_s = 300.0

    def __init__(self, address: str, timeout: float | None = None, tls: ClientTLS | None = None,
                 stall_timeout_s: float | None = None) -> None:
        stall_timeout_s = self.default_stall_timeout_s if stall_timeout_s is None else stall_timeout_s
        if not stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0 (seconds a rollout worker may hold requests without "
                             f"answering before its Generate call is cancelled), got {stall_timeout_s}")
        self.stall_timeout_s = stall_timeout_s
        super().__init__(address, timeout, tls)
        self._last = self._progress_rpc()
        self.name = self._last.name
        self.max_running = self._last.max_running
        self._role: Role = convert.ROLE_FROM_PROTO.get(self._last.role, ROLLOUT)

    def _progress_rpc(self) -> rollout_pb2.ProgressResponse:
        return self._call("Progress", rollout_pb2.ProgressRequest())

    def _decode_iterations(self) -> int | None:
        """The engine's decode iterations of the step in progress (None when the worker does not answer)."""
        try:
            stats = self._call("Progress", rollout_pb2.ProgressRequest(), timeout=min(self.stall_timeout_s, 10.0)).stats
        except RpcError:
            return None
        return stats.sd_iterations + stats.plain_iterations

    @property
    def policy_version(self) -> int:
        return self._last.policy_version

    @property
    def drafter_version(self) -> int:
        return self._last.drafter_version

    @property
    def speculative(self) -> bool:
        return self._last.speculative

    @property
    def role(self) -> Role:
        return self._role

    def load_policy(self, version: int = -1) -> bool:
        reply = self._call("LoadPolicy", rollout_pb2.LoadVersionRequest(version=version))
        self._last.policy_version = reply.version
        return reply.loaded

    def load_drafter(self, version: int = -1) -> bool:
        reply = self._call("LoadDrafter", rollout_pb2.LoadVersionRequest(version=version))
        self._last.drafter_version = reply.version
        return reply.loaded

    def set_role(self, role: Role) -> Role:
        reply = self._call("SetRole", rollout_pb2.SetRoleRequest(role=convert.ROLE_TO_PROTO[role]))
        self._role = role
        return convert.ROLE_FROM_PROTO.get(reply.previous, ROLLOUT)

    def progress(self) -> WorkerProgress:
        self._last = self._progress_rpc()
        p = self._last
        return WorkerProgress(self.name, p.running, p.queued, p.finished, p.buffered_responses)

    def live_stats(self) -> SpecDecodeStats:
        return convert.stats_from_proto(self._last.stats)

    def tuner_state(self) -> dict | None:
        reply = self._call("DrafterTraining", rollout_pb2.DrafterTrainingRequest())
        return json.loads(reply.tuner_state_json) if reply.tuner_state_json else None

    def load_tuner_state(self, state: dict | None) -> None:
        if state:
            self._call("DrafterTraining", rollout_pb2.DrafterTrainingRequest(load_tuner_state_json=json.dumps(state)))

    def run_rollout(self, queue: RequestQueue, on_result: Callable[[RolloutRequest, RequestOutput], None],
                    step_over: threading.Event) -> WorkerStepSummary:
        """Stream requests to the worker while it has free slots (pull-based, like the in-process worker),
        hand back results, and half-close when ``step_over`` is set. A worker that stalls (see the class) has
        its call cancelled; like any failed call, its unanswered requests go back to ``queue``."""
        capacity = min(self.max_running, queue.fair_share)
        in_flight: dict[str, RolloutRequest] = {}
        slots = threading.Condition()
        failed = half_closed = False
        last_answer = time.monotonic()  # the stall clock: reset by every event and when the worker gets busy

        def requests() -> Iterator[rollout_pb2.GenerateRequest]:
            nonlocal half_closed, last_answer
            while not step_over.is_set():
                with slots:
                    if failed:
                        return
                    free = capacity - len(in_flight)
                    batch = queue.take(free) if free > 0 else []
                    if batch and not in_flight:  # time without requests is not a stall
                        last_answer = time.monotonic()
                    for r in batch:
                        in_flight[r.request_id] = r
                    if not batch:
                        slots.wait(0.02)
                for r in batch:
                    yield rollout_pb2.GenerateRequest(request_id=r.request_id, prompt_ids=r.prompt_ids,
                                                      params=convert.params_to_proto(r.params), group=r.group)
            with slots:
                half_closed = True
                if not in_flight:
                    last_answer = time.monotonic()

        call = self.current_stub().Generate(requests())
        stalled: list[str] = []
        done = threading.Event()

        def watch() -> None:
            nonlocal last_answer
            decoded: int | None = None  # the worker's decode iterations when the clock last ran out
            while not done.wait(min(1.0, self.stall_timeout_s / 4)):
                with slots:
                    owed = (f"{len(in_flight)} unanswered request(s)" if in_flight
                            else "the step summary" if half_closed else "")
                    silent = time.monotonic() - last_answer
                if not owed or silent <= self.stall_timeout_s:
                    continue
                now_decoded = self._decode_iterations()
                if now_decoded is not None and now_decoded != decoded:  # silent but decoding: one long response
                    decoded = now_decoded
                    with slots:
                        last_answer = time.monotonic()
                    continue
                stalled.append(f"{self._what('Generate')}: no answer for {silent:.1f} s and no decoding progress "
                               f"while the worker owed {owed} (stall_timeout_s={self.stall_timeout_s:g}); cancelled "
                               "the call and handed its requests back. Is the worker stuck?")
                call.cancel()
                return

        threading.Thread(target=watch, name=f"{self.name}-stall-watch", daemon=True).start()
        summary = None
        try:
            for event in call:
                with slots:
                    last_answer = time.monotonic()
                if event.HasField("summary"):
                    summary = summary_from_proto(self.name, event.summary)
                    continue
                c = event.completion
                with slots:
                    request = in_flight.pop(c.request_id)
                    slots.notify()
                on_result(request, RequestOutput(c.request_id, request.prompt_ids, list(c.token_ids),
                                                 list(c.logprobs), c.finish_reason))
        except grpc.RpcError as exc:
            with slots:  # hand the unanswered requests back, so the other workers finish them
                failed = True
                queue.put_back(list(in_flight.values()))
                in_flight.clear()
            if stalled:
                raise RpcError(stalled[0], grpc.StatusCode.DEADLINE_EXCEEDED) from None
            raise from_grpc(exc, self._what("Generate")) from None
        finally:
            done.set()
        if summary is None:
            raise RpcError(f"{self._what('Generate')}: the stream ended without a step summary")
        return summary
