"""`tlt serve rollout|drafter|trainer`: one TLT service as a process — a gRPC server (with health and
reflection) plus an HTTP server for /metrics, /healthz and /readyz, stopped gracefully on SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tlt import metrics as m
from tlt.config import JobSpec
from tlt.errors import ConfigError
from tlt.rpc.tls import ClientTLS, ServerTLS
from tlt.store import ArtifactStore

log = logging.getLogger("tlt.serve")
KINDS = ("rollout", "drafter", "trainer")
DRAFTER_WAIT_S = 600.0


@dataclass
class ServeOptions:
    """Where and as whom a service listens."""

    kind: str
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 8080
    name: str = ""
    drafter: str = ""  # drafter service address (rollout workers push deltas there)
    threads: int = 0
    port_file: Path | None = None  # written once serving: {"port": ..., "metrics_port": ...}
    grace_s: float = 30.0
    tls: ServerTLS | None = None  # serve over TLS (mutual TLS when it holds a client CA); None: plaintext
    drafter_tls: ClientTLS | None = None  # how a rollout worker reaches the --drafter service; None: plaintext


def serve(spec: JobSpec, opts: ServeOptions) -> None:
    """Build the service for ``opts.kind``, serve until SIGTERM/SIGINT, then drain and exit."""
    from tlt.controller.components import resolve_model_dir, set_threads
    from tlt.rpc.server import serve_until_signal, start_server
    from tlt.serving.http import MetricsServer
    from tlt.serving.launcher import die_with_parent

    if opts.kind not in KINDS:
        raise ConfigError(f"service must be one of {', '.join(KINDS)}, got {opts.kind!r}")
    die_with_parent()
    registry = m.new_registry()
    ready = {"ok": False, "reason": "starting"}
    http = MetricsServer(opts.metrics_port, opts.host, registry,
                         ready=lambda: (ready["ok"], ready["reason"])).start()
    try:
        set_threads(opts.threads or spec.threads or (os.cpu_count() or 1))
        store = ArtifactStore(spec.store_uri)
        model_dir = resolve_model_dir(spec)
        build = {"rollout": _rollout, "drafter": _drafter, "trainer": _trainer}[opts.kind]
        add, servicer, service_name, samples, on_stop = build(spec, opts, store, model_dir, registry)
        registry.register(m.CallbackCollector(samples))
        server = start_server([(add, servicer, service_name)], opts.host, opts.port, tls=opts.tls)
        ready.update(ok=True, reason="serving")
        if opts.port_file is not None:
            tmp = opts.port_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"port": server.port, "metrics_port": http.port, "pid": os.getpid()}))
            tmp.replace(opts.port_file)
        transport = "plaintext" if opts.tls is None else "mutual TLS" if opts.tls.mutual else "TLS"
        log.info("%s serving gRPC (%s) on %s:%d, metrics on :%d", opts.kind, transport, opts.host, server.port,
                 http.port)

        def stop() -> None:
            ready.update(ok=False, reason="shutting down")
            on_stop()

        serve_until_signal(server, stop, opts.grace_s)
    finally:
        http.stop()


Built = tuple[Callable, object, str, Callable[[], list], Callable[[], None]]


def _rollout(spec: JobSpec, opts: ServeOptions, store: ArtifactStore, model_dir: Path, registry) -> Built:
    from tlt.drafter.service import RemoteDrafter
    from tlt.models.drafter_io import load_drafter
    from tlt.models.loader import load_model, resolve_device
    from tlt.rollout.service import SERVICE_NAME, RolloutServicer
    from tlt.rollout.worker import RolloutWorker
    from tlt.rpc.v1.rollout_pb2_grpc import add_RolloutServicer_to_server
    from tlt.store.kinds import DRAFTER_KIND

    if spec.rollout.backend == "vllm":
        return _vllm_rollout(spec, opts, store, model_dir, registry)
    model = load_model(model_dir, dtype=spec.model.dtype, device=resolve_device(spec.model.device))
    drafter, push, closers = None, None, []
    if spec.rollout.speculative.mode != "off":
        version = _wait_for_version(store, DRAFTER_KIND, DRAFTER_WAIT_S)
        directory = store.fetch(DRAFTER_KIND, version, Path(spec.output_dir) / "cache" / opts.name / "drafter",
                                link=True)  # only read (by load_drafter)
        drafter = load_drafter(directory, model)
        if spec.drafter.online_training:
            if not opts.drafter:
                raise ConfigError("drafter.online_training is on: give the drafter service address with --drafter "
                                  "HOST:PORT (or set drafter.online_training: false)")
            remote = RemoteDrafter(opts.drafter, tls=opts.drafter_tls)
            push, closers = remote.push_delta, [remote.close]
    worker = RolloutWorker(opts.name or "rollout", model, spec, drafter, store, push_delta=push)

    def on_stop() -> None:
        worker.set_role("rollout")  # preempts drafter training so the drain is short
        for close in closers:
            close()

    servicer = RolloutServicer(worker, registry)
    return add_RolloutServicer_to_server, servicer, SERVICE_NAME, worker.metric_samples, on_stop


def _vllm_rollout(spec: JobSpec, opts: ServeOptions, store: ArtifactStore, model_dir: Path, registry) -> Built:
    """A rollout service on the vLLM backend: same RPCs; vLLM reads the drafter's EAGLE-3 files itself."""
    from tlt.models.loader import resolve_device
    from tlt.rollout.backends.vllm import VllmRolloutWorker, one_engine_process_defaults
    from tlt.rollout.service import SERVICE_NAME, RolloutServicer
    from tlt.rpc.v1.rollout_pb2_grpc import add_RolloutServicer_to_server
    from tlt.store.kinds import DRAFTER_KIND

    one_engine_process_defaults(resolve_device("auto"))  # this process holds one engine
    directory = None
    if spec.rollout.speculative.mode != "off":
        version = _wait_for_version(store, DRAFTER_KIND, DRAFTER_WAIT_S)
        directory = store.fetch(DRAFTER_KIND, version, Path(spec.output_dir) / "cache" / opts.name / "drafter",
                                link=True)  # only read (by vLLM at start; reloads come from the store)
    worker = VllmRolloutWorker(opts.name or "rollout", model_dir, spec, store, drafter_dir=directory)
    servicer = RolloutServicer(worker, registry)
    return add_RolloutServicer_to_server, servicer, SERVICE_NAME, worker.metric_samples, worker.close


def _drafter(spec: JobSpec, opts: ServeOptions, store: ArtifactStore, model_dir: Path, registry) -> Built:
    from tlt.drafter.service import SERVICE_NAME, DrafterServicer, open_aggregator
    from tlt.models.loader import load_model
    from tlt.rpc.v1.drafter_pb2_grpc import add_DrafterServicer_to_server

    aggregator = open_aggregator(spec, model_dir, load_model(model_dir, dtype="float32"), store)
    servicer = DrafterServicer(aggregator, registry)

    def samples() -> list[m.Sample]:
        s = aggregator.status()
        return [(m.DRAFTER_VERSION, {}, s.version), (m.DRAFTER_DELTA_TOKENS, {}, s.total_tokens),
                (m.DRAFTER_DELTAS_REJECTED, {}, servicer.rejected), (m.DRAFTER_PENDING_WORKERS, {}, s.pending_workers),
                (m.DRAFTER_PUBLISHES, {}, len(s.published)),
                *[(m.DRAFTER_DELTAS, {"worker": w}, n) for w, n in servicer.received.items()]]

    return add_DrafterServicer_to_server, servicer, SERVICE_NAME, samples, lambda: None


def _trainer(spec: JobSpec, opts: ServeOptions, store: ArtifactStore, model_dir: Path, registry) -> Built:
    from tlt.rpc.v1.trainer_pb2_grpc import add_TrainerServicer_to_server
    from tlt.trainer.service import SERVICE_NAME, TrainerEndpoint, TrainerServicer

    endpoint = TrainerEndpoint(spec, model_dir, store)
    servicer = TrainerServicer(endpoint, registry)

    def samples() -> list[m.Sample]:
        last = endpoint.last_metrics
        return [(m.TRAINER_STEPS, {}, endpoint.steps), (m.TRAINER_OPTIMIZER_STEPS, {}, endpoint.optimizer_steps),
                (m.TRAINER_SAMPLES, {}, endpoint.samples), (m.TRAINER_LOSS, {}, last.get("loss")),
                (m.TRAINER_REWARD_MEAN, {}, last.get("reward_mean")),
                (m.TRAINER_POLICY_VERSION, {}, endpoint.last_published),
                (m.TRAINER_LAST_STEP_SECONDS, {}, last.get("step_seconds"))]

    return add_TrainerServicer_to_server, servicer, SERVICE_NAME, samples, endpoint.close


def _wait_for_version(store: ArtifactStore, kind: str, timeout: float) -> int:
    """The newest version of ``kind``, waiting for the service that publishes it (pods start in any order)."""
    deadline = time.monotonic() + timeout
    while True:
        latest = store.latest(kind)
        if latest is not None:
            return latest.version
        if time.monotonic() > deadline:
            raise ConfigError(f"no {kind} version appeared in store {store} within {timeout:.0f} s; "
                              f"is the {kind} service running with the same store.uri?")
        time.sleep(0.5)
