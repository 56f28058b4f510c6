"""Shared gRPC server plumbing for the TLT services: error mapping and metrics per method, the standard
health and reflection services, message size limits, optional TLS (:class:`~tlt.rpc.tls.ServerTLS`), and
graceful shutdown that drains in-flight RPCs."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from tlt.errors import PortInUseError
from tlt.metrics import RpcMetrics
from tlt.rpc.errors import status_for
from tlt.rpc.tls import ServerTLS

log = logging.getLogger(__name__)

# Whole weight versions never travel in one message (they go through the object store, deltas and
# batches are streamed in chunks), so 64 MiB bounds one message with room to spare.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024
SIGNAL_POLL_S = 0.1  # how often serve_until_signal looks whether SIGTERM/SIGINT came
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),  # a second service on a taken port fails instead of silently sharing its traffic
]


def rpc_method(func: Callable) -> Callable:
    """Wrap a servicer method: TLT errors become status codes with their message, bugs become INTERNAL
    (logged with traceback) and the server keeps serving; every call is counted by code and timed."""
    name = func.__name__

    def fail(self, context: grpc.ServicerContext, exc: BaseException, start: float):
        code = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s.%s failed", self.service_name, name)
            message = f"internal error in {self.service_name}.{name}: {type(exc).__name__}: {exc}"
        else:
            message = str(exc)
        self.rpc_metrics.observe(name, code.name, time.perf_counter() - start)
        context.abort(code, message)

    if inspect.isgeneratorfunction(func):
        @functools.wraps(func)
        def stream_wrapper(self, request, context):
            start = time.perf_counter()
            try:
                yield from func(self, request, context)
            except grpc.RpcError:
                raise
            except Exception as exc:
                fail(self, context, exc, start)
            else:
                self.rpc_metrics.observe(name, "OK", time.perf_counter() - start)
        return stream_wrapper

    @functools.wraps(func)
    def unary_wrapper(self, request, context):
        start = time.perf_counter()
        try:
            response = func(self, request, context)
        except grpc.RpcError:
            raise
        except Exception as exc:
            fail(self, context, exc, start)
        self.rpc_metrics.observe(name, "OK", time.perf_counter() - start)
        return response
    return unary_wrapper


class ServicerBase:
    """Base of the TLT servicers: ``service_name`` labels the RPC metrics."""

    service_name = "tlt"

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rpc_metrics = RpcMetrics(self.service_name, registry)


@dataclass
class GrpcServer:
    """A started gRPC server with health (per service and overall) and reflection."""

    server: grpc.Server
    port: int
    service_names: list[str]
    health: health.HealthServicer
    tls: ServerTLS | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new RPCs, let in-flight ones finish for up to ``grace_s``, then stop."""
        if self._stopped.is_set():
            return
        self.set_serving(False)
        self.server.stop(grace_s).wait()
        self._stopped.set()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(services: list[tuple[Callable, object, str]], host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 16, tls: ServerTLS | None = None) -> GrpcServer:
    """Start a server for ``(add_XServicer_to_server, servicer, full service name)`` triples on
    ``host:port`` (port 0: any free port, see ``.port``); over TLS with ``tls``, else plaintext."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         options=SERVER_OPTIONS)
    names = []
    for add, servicer, name in services:
        add(servicer, server)
        names.append(name)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    try:
        bound = (server.add_insecure_port(address) if tls is None
                 else server.add_secure_port(address, tls.credentials()))
    except RuntimeError as exc:
        raise PortInUseError(f"cannot listen on {address}: {exc}; pass --port with a free port (or 0 to pick one)"
                             ) from None
    if bound == 0:
        raise PortInUseError(f"cannot listen on {address} (port in use?); pass --port with a free port (or 0 to "
                             "pick one)")
    server.start()
    out = GrpcServer(server, bound, names, health_servicer, tls)
    out.set_serving(True)
    return out


def serve_until_signal(server: GrpcServer, on_stop: Callable[[], None] | None = None, grace_s: float = 30.0) -> None:
    """Block until SIGTERM/SIGINT, then drain in-flight RPCs (Kubernetes sends SIGTERM on pod deletion)."""
    received: list[int] = []

    def handle(signum, frame) -> None:
        # No lock here: the handler runs in the main thread between bytecodes, maybe while that thread holds a
        # lock (an Event's, in wait() or in an earlier handler's set()), and taking it again would hang forever.
        received.append(signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not received:
            time.sleep(SIGNAL_POLL_S)
        log.info("shutting down: draining in-flight RPCs for up to %.0f s", grace_s)
        if on_stop is not None:
            on_stop()
        server.stop(grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of at most ``size`` bytes (at least one piece)."""
    for start in range(0, max(len(data), 1), size):
        yield data[start:start + size]
