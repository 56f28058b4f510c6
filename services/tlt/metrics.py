"""Every Prometheus metric TLT exports, in one place.

Names follow ``tlt_<component>_<what>_<unit>``; the speculative-decoding counters mirror vLLM's
(``..._spec_decode_num_draft_tokens_total``, ``..._num_accepted_tokens_total``) so stock panels fit.
Values are read from the live objects when Prometheus scrapes (custom collectors), so nothing is
instrumented on the decode hot path. The dashboards in ``dashboards/`` may only use names listed in
:data:`ALL_METRICS` (a test cross-checks them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class MetricDef:
    """A metric's name (without the ``_total`` suffix for counters), type, help text and labels."""

    name: str
    kind: str  # gauge | counter | histogram
    help: str
    labels: tuple[str, ...] = ()


def _d(name: str, kind: str, help_text: str, *labels: str) -> MetricDef:
    return MetricDef(name, kind, help_text, labels)


# ---- rollout workers (label worker = worker / pod name) ----------------------------------------
ROLLOUT_REQUESTS_RUNNING = _d("tlt_rollout_requests_running", "gauge", "Requests decoding now", "worker")
ROLLOUT_REQUESTS_QUEUED = _d("tlt_rollout_requests_queued", "gauge",
                             "Requests accepted by the worker, waiting for a slot", "worker")
ROLLOUT_REQUESTS_UNANSWERED = _d("tlt_rollout_requests_unanswered", "gauge",
                                 "Requests read from the Generate stream and not yet answered; the service stops "
                                 "reading at 4 per slot (backpressure)", "worker")
ROLLOUT_REQUESTS_FINISHED = _d("tlt_rollout_requests_finished", "counter", "Requests finished", "worker")
ROLLOUT_GENERATED_TOKENS = _d("tlt_rollout_generated_tokens", "counter", "Tokens generated", "worker")
ROLLOUT_BUFFERED_RESPONSES = _d("tlt_rollout_buffered_responses", "gauge",
                                "Finished responses of this step held for drafter training", "worker")
ROLLOUT_ROLE = _d("tlt_rollout_role", "gauge", "1 for the worker's current role", "worker", "role")
ROLLOUT_ROLE_SECONDS = _d("tlt_rollout_role_seconds", "counter",
                          "Time spent decoding (rollout), training the drafter (drafter) or idle", "worker", "role")
ROLLOUT_POLICY_VERSION = _d("tlt_rollout_policy_version", "gauge", "Policy version loaded", "worker")
ROLLOUT_DRAFTER_VERSION = _d("tlt_rollout_drafter_version", "gauge", "Drafter version loaded", "worker")
ROLLOUT_SPEC_DECODE_NUM_DRAFTS = _d("tlt_rollout_spec_decode_num_drafts", "counter",
                                    "Speculative verification passes (per sequence)", "worker")
ROLLOUT_SPEC_DECODE_NUM_DRAFT_TOKENS = _d("tlt_rollout_spec_decode_num_draft_tokens", "counter",
                                          "Draft tokens proposed for verification", "worker")
ROLLOUT_SPEC_DECODE_NUM_ACCEPTED_TOKENS = _d("tlt_rollout_spec_decode_num_accepted_tokens", "counter",
                                             "Draft tokens accepted", "worker")
ROLLOUT_SPEC_DECODE_ACCEPTED_PER_POS = _d("tlt_rollout_spec_decode_num_accepted_tokens_per_pos", "counter",
                                          "Drafts whose draft token at this position was accepted",
                                          "worker", "position")
ROLLOUT_DECODE_SECONDS = _d("tlt_rollout_decode_seconds", "counter",
                            "Decode time with speculative decoding on or off", "worker", "sd")
ROLLOUT_DECODE_ITERATIONS = _d("tlt_rollout_decode_iterations", "counter",
                               "Decode iterations with speculative decoding on or off", "worker", "sd")
ROLLOUT_BATCH_DECODE_ITERATIONS = _d("tlt_rollout_batch_decode_iterations", "counter",
                                     "Decode iterations with speculative decoding on or off by running batch "
                                     "size (the SD tuner's buckets, e.g. 3-4)", "worker", "sd", "batch_size")
ROLLOUT_DRAFTER_TRAIN_STEPS = _d("tlt_rollout_drafter_train_steps", "counter",
                                 "Drafter optimizer steps done in the drafter role", "worker")
ROLLOUT_DRAFTER_TRAIN_TOKENS = _d("tlt_rollout_drafter_train_tokens", "counter",
                                  "Target tokens the drafter trained on", "worker")
ROLLOUT_DRAFTER_PUSHES = _d("tlt_rollout_drafter_pushes", "counter", "Deltas pushed to the aggregator", "worker")
ROLLOUT_DRAFTER_LOSS = _d("tlt_rollout_drafter_loss", "gauge", "Last drafter training loss", "worker")

# ---- drafter-training service -----------------------------------------------------------------
DRAFTER_VERSION = _d("tlt_drafter_version", "gauge", "Newest published drafter version")
DRAFTER_DELTAS = _d("tlt_drafter_deltas", "counter", "Deltas received", "worker")
DRAFTER_DELTA_TOKENS = _d("tlt_drafter_delta_tokens", "counter", "Target tokens behind the received deltas")
DRAFTER_DELTAS_REJECTED = _d("tlt_drafter_deltas_rejected", "counter", "Deltas refused (bad shape, NaN, ...)")
DRAFTER_PENDING_WORKERS = _d("tlt_drafter_pending_workers", "gauge", "Workers with deltas not yet published")
DRAFTER_PUBLISHES = _d("tlt_drafter_publishes", "counter", "Drafter versions published")

# ---- policy trainer ---------------------------------------------------------------------------
TRAINER_STEPS = _d("tlt_trainer_steps", "counter", "GRPO steps (batches) trained")
TRAINER_OPTIMIZER_STEPS = _d("tlt_trainer_optimizer_steps", "gauge", "Optimizer updates so far")
TRAINER_LAST_STEP_SECONDS = _d("tlt_trainer_last_step_seconds", "gauge", "Time of the last GRPO step")
TRAINER_SAMPLES = _d("tlt_trainer_samples", "counter", "Samples trained on")
TRAINER_LOSS = _d("tlt_trainer_loss", "gauge", "Last GRPO loss")
TRAINER_REWARD_MEAN = _d("tlt_trainer_reward_mean", "gauge", "Mean reward of the last batch")
TRAINER_POLICY_VERSION = _d("tlt_trainer_policy_version", "gauge", "Newest policy version published")

# ---- controller -------------------------------------------------------------------------------
CONTROLLER_STEP = _d("tlt_controller_step", "gauge", "RL steps completed")
CONTROLLER_PHASE = _d("tlt_controller_phase", "gauge", "1 for the current phase (rollout, update, done)", "phase")
CONTROLLER_PENDING_REQUESTS = _d("tlt_controller_pending_requests", "gauge",
                                 "Requests of this step not yet taken by any worker")
CONTROLLER_UNANSWERED_REQUESTS = _d("tlt_controller_unanswered_requests", "gauge",
                                    "Requests of this step not yet answered (queued or being decoded)")
CONTROLLER_LAST_STEP_SECONDS = _d("tlt_controller_last_step_seconds", "gauge",
                                  "Time of the last step by phase (total, rollout, tail, train, publish)", "phase")
CONTROLLER_REWARD_MEAN = _d("tlt_controller_reward_mean", "gauge", "Mean reward of the last step's rollouts")
CONTROLLER_HELDOUT_REWARD = _d("tlt_controller_heldout_reward", "gauge", "Last held-out reward")
CONTROLLER_ACCEPTANCE_LENGTH = _d("tlt_controller_acceptance_length", "gauge",
                                  "Acceptance length of the last step (all workers)")
CONTROLLER_POLICY_VERSION = _d("tlt_controller_policy_version", "gauge", "Policy version of the current step")
CONTROLLER_DRAFTER_VERSION = _d("tlt_controller_drafter_version", "gauge", "Drafter version of the current step")

# ---- gRPC servers (every service) -------------------------------------------------------------
RPC_HANDLED = _d("tlt_rpc_server_handled", "counter", "RPCs completed, by status code", "service", "method", "code")
RPC_HANDLING_SECONDS = _d("tlt_rpc_server_handling_seconds", "histogram", "RPC handling time", "service", "method")

ALL_METRICS: tuple[MetricDef, ...] = tuple(v for k, v in dict(globals()).items() if isinstance(v, MetricDef)
                                           and k.isupper())


def exported_names() -> set[str]:
    """Every series name a scrape can contain (with the suffixes Prometheus adds)."""
    names = set()
    for m in ALL_METRICS:
        if m.kind == "counter":
            names |= {m.name + "_total", m.name + "_created"}
        elif m.kind == "histogram":
            names |= {m.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(m.name)
    return names


# ---- building blocks ------------------------------------------------------------------------------

Sample = tuple[MetricDef, dict[str, str], float]

def new_registry(*collect: Callable[[], Iterable[Sample]]) -> CollectorRegistry:
    """A registry serving the given sample readers. Callback collectors cannot describe their metrics in
    advance, so the registry must include them when a scrape filters by name (``/metrics?name[]=...``)."""
    registry = CollectorRegistry(support_collectors_without_names=True)
    for read in collect:
        registry.register(CallbackCollector(read))
    return registry


def family(metric: MetricDef, samples: Iterable[tuple[dict[str, str], float]]):
    """A gauge or counter family of ``metric`` with the given (labels, value) samples."""
    cls = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
    fam = cls(metric.name, metric.help, labels=list(metric.labels))
    for labels, value in samples:
        fam.add_metric([labels[k] for k in metric.labels], float(value))
    return fam


class CallbackCollector(Collector):
    """Collects whatever ``read()`` returns at scrape time: (metric, labels, value) triples.

    Samples of the same metric are grouped into one family; a failing read exports nothing rather than
    breaking the whole scrape.
    """

    def __init__(self, read: Callable[[], Iterable[Sample]]) -> None:
        self._read = read

    def collect(self) -> Iterator:
        try:
            samples = list(self._read())
        except Exception:  # a half-built object must not break /metrics
            return
        grouped: dict[MetricDef, list[tuple[dict[str, str], float]]] = {}
        for metric, labels, value in samples:
            if value is not None:
                grouped.setdefault(metric, []).append((labels, value))
        for metric, values in grouped.items():
            yield family(metric, values)


def one_hot(metric: MetricDef, current: str, choices: Iterable[str], **labels: str) -> list[Sample]:
    """Samples of a 'which state' gauge: 1 for ``current``, 0 for the other choices."""
    key = metric.labels[-1]
    return [(metric, {**labels, key: c}, 1.0 if c == current else 0.0) for c in choices]


class RpcMetrics:
    """Per-method call counts by status code and handling time of one gRPC service."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.service = service
        self.handled = Counter(RPC_HANDLED.name, RPC_HANDLED.help, list(RPC_HANDLED.labels), registry=registry)
        self.seconds = Histogram(RPC_HANDLING_SECONDS.name, RPC_HANDLING_SECONDS.help,
                                 list(RPC_HANDLING_SECONDS.labels), registry=registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.handled.labels(self.service, method, code).inc()
        self.seconds.labels(self.service, method).observe(seconds)


class Stopwatch:
    """Accumulates time per state (e.g. a worker's role), readable at any moment (thread-safe)."""

    def __init__(self, state: str) -> None:
        self._lock = threading.Lock()
        self._state = state
        self._since = time.monotonic()
        self._totals: dict[str, float] = {}

    def switch(self, state: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._totals[self._state] = self._totals.get(self._state, 0.0) + now - self._since
            self._state, self._since = state, now

    def totals(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._totals)
            out[self._state] = out.get(self._state, 0.0) + time.monotonic() - self._since
            return out
