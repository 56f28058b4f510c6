"""Client side of the TLT services: channels with retries for idempotent calls, deadlines on every
call, readiness waiting through the standard health service, and :func:`set_worker_role` for the
operator."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tlt.rpc.errors import RpcError, from_grpc
from tlt.rpc.server import MAX_MESSAGE_BYTES

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


def open_channel(address: str) -> grpc.Channel:
    """An insecure channel to ``host:port`` with TLT's retry policy and message limits."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


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


def set_worker_role(address: str, role: str, timeout: float = 5.0) -> None:
    """Move the rollout worker at ``address`` to ``role`` ("rollout" or "drafter")."""
    from tlt.rpc.convert import ROLE_TO_PROTO
    from tlt.rpc.v1 import rollout_pb2, rollout_pb2_grpc

    if role not in ROLE_TO_PROTO:
        raise RpcError(f"role must be one of {sorted(ROLE_TO_PROTO)}, got {role!r}", grpc.StatusCode.INVALID_ARGUMENT)
    with open_channel(address) as channel:
        stub = rollout_pb2_grpc.RolloutStub(channel)
        call(stub.SetRole, rollout_pb2.SetRoleRequest(role=ROLE_TO_PROTO[role]), f"SetRole on {address}", timeout)
