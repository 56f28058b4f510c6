"""Client side of the TLT services: channels (plaintext, or TLS with :class:`~tlt.rpc.tls.ClientTLS`) with
retries for idempotent calls, deadlines on every call, readiness waiting through the standard health service,
:class:`RemoteClient` (the base of the controller's handles on the services) and :func:`set_worker_role` for
the operator."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tlt.errors import ConfigError
from tlt.rpc.errors import RpcError, from_grpc
from tlt.rpc.server import MAX_MESSAGE_BYTES
from tlt.rpc.tls import ClientTLS, FileChanges

log = logging.getLogger(__name__)

# Calls that are safe to repeat: gRPC retries them on UNAVAILABLE with exponential backoff. Streams that
# carry work (Generate, PushDelta, TrainStep) and the drafter Publish are not retried automatically.
IDEMPOTENT = {
    "tlt.v1.Rollout": ["SetRole", "LoadPolicy", "LoadDrafter", "Progress", "DrafterTraining"],
    "tlt.v1.Drafter": ["LatestVersion", "Status"],
    "tlt.v1.Trainer": ["PublishPolicy", "SaveCheckpoint", "LoadCheckpoint", "Status"],
}
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": service, "method": method} for service, methods in IDEMPOTENT.items()
             for method in methods],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "3s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 30_000),
    # a restarted service (same address) is found again within seconds, not after minutes of backoff
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
DEFAULT_TIMEOUT_S = 30.0


def open_channel(address: str, tls: ClientTLS | None = None) -> grpc.Channel:
    """A channel to ``host:port`` with TLT's retry policy and message limits: TLS with ``tls``, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, tls.credentials(), options=[*CHANNEL_OPTIONS, *tls.channel_options()])


def call(method: Callable, request: Any, what: str, timeout: float | None = DEFAULT_TIMEOUT_S, **kwargs) -> Any:
    """Invoke a unary (or client-streaming) stub method with a deadline; failures become RpcError."""
    try:
        return method(request, timeout=timeout, **kwargs)
    except grpc.RpcError as exc:
        raise from_grpc(exc, what) from None


def wait_ready(channel: grpc.Channel, address: str, timeout: float = 60.0, service: str = "") -> None:
    """Block until the server's health service reports SERVING (or raise RpcError after ``timeout``)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.1)
    raise RpcError(f"{address} did not become ready within {timeout:.0f} s (last: {last})",
                   grpc.StatusCode.UNAVAILABLE)


class RemoteClient:
    """Base of the handles on a service at ``address``: one channel (TLS with ``tls``), the service's stub,
    a default deadline, and failures named after the peer (``<method> on <peer> at <address>``).

    With TLS read from files, each call first checks whether the files changed (certificates renewed in
    place) and, if the new ones pass the checks, moves to a new channel dialed with them; calls and streams
    in flight finish on the old channel, which is closed with the client. A renewal that fails the checks
    (e.g. half written) is logged and the current channel kept.

    Subclasses set ``stub_class`` (the generated stub), ``peer`` (how errors name the service) and
    ``default_timeout`` (the deadline of a call, in seconds, when the constructor is not given one).
    """

    stub_class: ClassVar[Callable[[grpc.Channel], Any]]
    peer: ClassVar[str] = "service"
    default_timeout: ClassVar[float] = 60.0

    def __init__(self, address: str, timeout: float | None = None, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.timeout = self.default_timeout if timeout is None else timeout
        self.tls = tls
        self._tls_changes = FileChanges(tls.files) if tls is not None and tls.files is not None else None
        self._swap_lock = threading.Lock()
        self._old_channels: list[grpc.Channel] = []
        self.channel = open_channel(address, tls)
        self.stub = self.stub_class(self.channel)

    def current_stub(self) -> Any:
        """The stub to call with: on a new channel first when the TLS files were renewed since the last call."""
        if self._tls_changes is not None and self._tls_changes.changed():
            self._renew_channel()
        return self.stub

    def _renew_channel(self) -> None:
        assert self.tls is not None
        try:
            fresh = self.tls.reread()
        except ConfigError as exc:
            log.warning("TLS files for %s changed but cannot be used, keeping the previous ones: %s",
                        self.address, exc)
            return
        with self._swap_lock:
            self._old_channels.append(self.channel)
            self.tls = fresh
            self.channel = open_channel(self.address, fresh)
            self.stub = self.stub_class(self.channel)
        log.info("TLS files for %s reloaded: new connections use them", self.address)

    def _what(self, method: str) -> str:
        return f"{method} on {self.peer} at {self.address}"

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """The stub's ``method`` with ``request`` under a deadline (default: ``self.timeout``)."""
        return call(getattr(self.current_stub(), method), request, self._what(method),
                    self.timeout if timeout is None else timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the service reports SERVING (e.g. after a restart)."""
        self.current_stub()
        wait_ready(self.channel, self.address, timeout)

    def close(self) -> None:
        """Close the channel (and those left by certificate renewals)."""
        with self._swap_lock:
            for channel in (*self._old_channels, self.channel):
                channel.close()
            self._old_channels.clear()


def set_worker_role(address: str, role: str, timeout: float = 5.0, tls: ClientTLS | None = None) -> None:
    """Move the rollout worker at ``address`` to ``role`` ("rollout" or "drafter"). Over TLS with ``tls``,
    else with the ``TLT_TLS_*`` environment (how the operator is configured), else plaintext."""
    from tlt.rpc.convert import ROLE_TO_PROTO
    from tlt.rpc.v1 import rollout_pb2, rollout_pb2_grpc

    if role not in ROLE_TO_PROTO:
        raise RpcError(f"role must be one of {sorted(ROLE_TO_PROTO)}, got {role!r}", grpc.StatusCode.INVALID_ARGUMENT)
    with open_channel(address, tls or ClientTLS.from_env()) as channel:
        stub = rollout_pb2_grpc.RolloutStub(channel)
        call(stub.SetRole, rollout_pb2.SetRoleRequest(role=ROLE_TO_PROTO[role]), f"SetRole on {address}", timeout)
