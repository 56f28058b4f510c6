"""How errors cross the wire: TLT exceptions map to gRPC status codes on the server, and gRPC failures
become :class:`RpcError` (a TLTError with the peer, method and code in its message) on the client."""

from __future__ import annotations

import errno

import grpc

from tlt.errors import TLTError
from tlt.store import StoreError, StoreFullError, StoreIntegrityError, VersionExistsError, VersionNotFoundError


class RpcError(TLTError):
    """A call to a TLT service failed; ``code`` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.code = code


class ConflictError(TLTError):
    """The request is valid but the service is busy with something it excludes (FAILED_PRECONDITION)."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a server answers ``exc`` with (INTERNAL for bugs)."""
    if isinstance(exc, VersionNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, VersionExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, StoreFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, StoreIntegrityError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, StoreError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (TLTError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is the service running and reachable (tlt serve ...)?",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the service did not answer in time; it may be overloaded or stuck",
}


def from_grpc(exc: grpc.RpcError, what: str) -> RpcError:
    """Turn a failed call into a readable RpcError: ``what`` names the peer and method."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    hint = HINTS.get(code)
    return RpcError(f"{what} failed with {code.name}: {detail}" + (f" ({hint})" if hint else ""), code)
