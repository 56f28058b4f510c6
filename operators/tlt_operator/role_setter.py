"""How the operator tells a rollout worker its new role: the ``SetRole`` RPC behind a small interface.

The operator only needs ``set_role(address, role, timeout)``; tests inject a recording fake, production uses
:class:`GrpcRoleSetter`, which imports the gRPC client lazily (the operator module imports without grpc stubs).
"""

from __future__ import annotations

from typing import Protocol


class RoleSetError(Exception):
    """The worker could not be told its role (unreachable, refused, timed out)."""


class RoleSetter(Protocol):
    def set_role(self, address: str, role: str, timeout: float) -> None:
        """Move the worker at ``host:port`` to ``role`` (``rollout`` or ``drafter``); raise RoleSetError on failure."""


class GrpcRoleSetter:
    """``tlt.rpc.client.set_worker_role(address, role, timeout)``; its RpcError becomes RoleSetError."""

    def set_role(self, address: str, role: str, timeout: float) -> None:
        from tlt.rpc.client import set_worker_role

        try:
            set_worker_role(address, role, timeout=timeout)
        except Exception as exc:  # RpcError, or grpc failing below it: the operator retries on the next tick
            raise RoleSetError(f"SetRole({role}) on {address} failed: {exc}") from exc
