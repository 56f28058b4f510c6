"""The drafter-training service over gRPC: :class:`DrafterServicer` serves a :class:`DrafterAggregator`;
:class:`RemoteDrafter` gives workers and the controller the aggregator's methods over the wire.

:func:`open_aggregator` is shared by the service and the in-process controller: it resumes the master
from the newest drafter version in the store, or builds the initial drafter and publishes version 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tlt.config import JobSpec
from tlt.drafter.aggregator import AggregatorStatus, DrafterAggregator, publish_drafter
from tlt.errors import InvalidRequestError
from tlt.models.drafter_io import copy_drafter_tensors
from tlt.models.transformer import CausalLM
from tlt.rpc.client import RemoteClient
from tlt.rpc.server import ServicerBase, chunks, rpc_method
from tlt.rpc.v1 import drafter_pb2, drafter_pb2_grpc
from tlt.store import ArtifactStore, VersionNotFoundError
from tlt.store.kinds import DRAFTER_KIND

SERVICE_NAME = "tlt.v1.Drafter"
MAX_DELTA_BYTES = 8 * 1024 * 1024 * 1024
DELTA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Target tokens one delta may claim: far above any real push, far below where the int64 token sums overflow.
MAX_DELTA_TOKENS = 2**40


def open_aggregator(spec: JobSpec, model_dir: Path, target: CausalLM, store: ArtifactStore) -> DrafterAggregator:
    """The master drafter at the newest version in ``store`` (resume), else the initial one published as v0."""
    from tlt.controller.components import initial_drafter

    master = initial_drafter(spec, model_dir, target)
    latest = store.latest(DRAFTER_KIND)
    if latest is None:
        publish_drafter(store, master, 0, {"source": spec.drafter.init})
        return DrafterAggregator(master, store, 0, spec.drafter.outer_lr)
    copy_drafter_tensors(master, store.load_tensors(DRAFTER_KIND, latest.version), f"drafter v{latest.version}")
    return DrafterAggregator(master, store, latest.version, spec.drafter.outer_lr)


class DrafterServicer(ServicerBase, drafter_pb2_grpc.DrafterServicer):
    """Serves the aggregator: deltas in, versions out."""

    service_name = "drafter"

    def __init__(self, aggregator: DrafterAggregator, registry) -> None:
        super().__init__(registry)
        self.aggregator = aggregator
        self.rejected = 0
        self.received: dict[str, int] = {}

    @rpc_method
    def PushDelta(self, request_iterator, context):  # noqa: N802
        header, payload = None, bytearray()
        for chunk in request_iterator:
            if chunk.HasField("header"):
                if header is not None:
                    raise InvalidRequestError("PushDelta: a second header in one stream; send one header first")
                header = chunk.header
                if header.size_bytes < 0 or header.size_bytes > MAX_DELTA_BYTES:
                    raise InvalidRequestError(f"PushDelta: size_bytes {header.size_bytes} is outside "
                                              f"[0, {MAX_DELTA_BYTES}]")
            elif header is None:
                raise InvalidRequestError("PushDelta: data before the header; send the DeltaHeader first")
            else:
                payload += chunk.data
                if len(payload) > header.size_bytes:
                    raise InvalidRequestError(f"PushDelta: more data than size_bytes ({header.size_bytes})")
        if header is None:
            raise InvalidRequestError("PushDelta: empty stream; send a DeltaHeader and the delta")
        if len(payload) != header.size_bytes:
            raise InvalidRequestError(f"PushDelta: got {len(payload)} bytes, header said {header.size_bytes}")
        try:
            delta = load_safetensors(bytes(payload))
            for name, value in delta.items():  # the aggregator's checks (NaN, inf) need a float dtype torch computes in
                if value.dtype not in DELTA_DTYPES:
                    raise InvalidRequestError(f"tensor {name} has dtype {value.dtype}; deltas are float32, float16, "
                                              "bfloat16 or float64")
            if header.tokens > MAX_DELTA_TOKENS:
                raise InvalidRequestError(f"tokens must be in [1, {MAX_DELTA_TOKENS}], got {header.tokens}")
            self.aggregator.push_delta(header.worker or "unnamed", delta, header.tokens, header.base_version)
        except VersionNotFoundError as exc:
            self.rejected += 1
            raise VersionNotFoundError(f"PushDelta from {header.worker!r}: {exc}") from None
        except (SafetensorError, InvalidRequestError, ValueError) as exc:
            self.rejected += 1
            raise InvalidRequestError(f"PushDelta from {header.worker!r}: {exc}") from None
        self.received[header.worker] = self.received.get(header.worker, 0) + 1
        status = self.aggregator.status()
        return drafter_pb2.PushDeltaResponse(pending_workers=status.pending_workers,
                                             pending_tokens=status.pending_tokens)

    @rpc_method
    def LatestVersion(self, request, context):  # noqa: N802
        return drafter_pb2.LatestVersionResponse(version=self.aggregator.version)

    @rpc_method
    def Publish(self, request, context):  # noqa: N802
        before = self.aggregator.status()
        version = self.aggregator.publish({"step": request.step})
        return drafter_pb2.PublishDrafterResponse(
            published=version is not None, version=self.aggregator.version,
            merged_workers=before.pending_workers if version is not None else 0,
            merged_tokens=before.pending_tokens if version is not None else 0)

    @rpc_method
    def Status(self, request, context):  # noqa: N802
        s = self.aggregator.status()
        return drafter_pb2.DrafterStatusResponse(version=s.version, pending_workers=s.pending_workers,
                                                 pending_tokens=s.pending_tokens, deltas_received=s.total_pushes,
                                                 deltas_rejected=self.rejected)


class RemoteDrafter(RemoteClient):
    """The aggregator's methods over gRPC (for rollout workers and the controller)."""

    stub_class = drafter_pb2_grpc.DrafterStub
    peer = "drafter service"
    default_timeout = 60.0

    def push_delta(self, worker: str, delta: dict[str, torch.Tensor], tokens: int, base_version: int = 0) -> None:
        """Stream ``delta`` (trained on ``tokens`` target tokens, computed against drafter ``base_version``)."""
        payload = save_safetensors({k: v.detach().float().contiguous() for k, v in delta.items()})

        def stream() -> Iterator[drafter_pb2.DeltaChunk]:
            yield drafter_pb2.DeltaChunk(header=drafter_pb2.DeltaHeader(
                worker=worker, tokens=tokens, base_version=base_version, size_bytes=len(payload)))
            for piece in chunks(payload):
                yield drafter_pb2.DeltaChunk(data=piece)

        self._call("PushDelta", stream())

    def publish(self, metadata: dict | None = None) -> int | None:
        step = int((metadata or {}).get("step", 0))
        reply = self._call("Publish", drafter_pb2.PublishDrafterRequest(step=step))
        return reply.version if reply.published else None

    @property
    def version(self) -> int:
        return self._call("LatestVersion", drafter_pb2.LatestVersionRequest()).version

    def status(self) -> AggregatorStatus:
        s = self._call("Status", drafter_pb2.DrafterStatusRequest())
        return AggregatorStatus(s.version, s.pending_workers, s.pending_tokens, s.deltas_received, 0)
