"""The policy trainer as a service: :class:`TrainerEndpoint` (a trainer that can also publish its policy
to the store), :class:`TrainerServicer` (it over gRPC) and :class:`RemoteTrainer` (the controller's handle,
same methods as the endpoint)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file as save_safetensors_file

from tlt.config import JobSpec
from tlt.errors import InvalidRequestError
from tlt.models.loader import load_model
from tlt.rpc import convert
from tlt.rpc.client import RemoteClient
from tlt.rpc.server import ServicerBase, rpc_method
from tlt.rpc.v1 import trainer_pb2, trainer_pb2_grpc
from tlt.store import ArtifactStore
from tlt.store.kinds import POLICY_KIND
from tlt.trainer.policy import META_FILE, Sample, make_policy_trainer

SERVICE_NAME = "tlt.v1.Trainer"
MAX_SAMPLES = 1_000_000


class TrainerEndpoint:
    """A GRPO trainer for ``spec`` that publishes policy versions (bf16 safetensors + config.json)."""

    def __init__(self, spec: JobSpec, model_dir: Path, store: ArtifactStore) -> None:
        self.store = store
        self.model_dir = model_dir
        self.trainer = make_policy_trainer(load_model(model_dir, dtype="float32"), spec.trainer.grpo,
                                           workers=spec.trainer.workers)
        self.workers = spec.trainer.workers
        self.last_published = -1
        self.last_metrics: dict[str, float] = {}
        self.steps = 0
        self.samples = 0

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self.trainer.train_step(samples)
        self.last_metrics = {**metrics, "step_seconds": time.perf_counter() - start}
        self.steps += 1
        self.samples += len(samples)
        return metrics

    @property
    def optimizer_steps(self) -> int:
        return self.trainer.step

    def publish_policy(self, version: int) -> int:
        """Publish the current weights as ``version``; returns the payload size in bytes.

        On a local store the weights are written once, on the store's own filesystem, and moved into
        the version (no second copy); on object stores they are uploaded from memory.
        """
        state = self.trainer.policy_state()
        files: dict[str, bytes | Path] = {"config.json": (self.model_dir / "config.json").read_bytes()}
        scratch = self.store.scratch_path(POLICY_KIND, "model.safetensors")
        try:
            if scratch is None:
                payload = save_safetensors(state)
                files["model.safetensors"], size = payload, len(payload)
            else:
                save_safetensors_file(state, str(scratch))
                files["model.safetensors"], size = scratch, scratch.stat().st_size
            self.store.publish(POLICY_KIND, version, files, metadata={"step": version}, move=True)
        finally:
            if scratch is not None:  # still there only if the publish failed
                scratch.unlink(missing_ok=True)
        self.last_published = version
        return size

    def save_checkpoint(self, directory: str | Path) -> None:
        self.trainer.save_checkpoint(directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        self.trainer.load_checkpoint(directory)

    def close(self) -> None:
        close = getattr(self.trainer, "close", None)
        if close is not None:
            close()


class TrainerServicer(ServicerBase, trainer_pb2_grpc.TrainerServicer):
    """Serves a TrainerEndpoint. Train steps are serialised (one batch at a time)."""

    service_name = "trainer"

    def __init__(self, endpoint: TrainerEndpoint, registry) -> None:
        super().__init__(registry)
        self.endpoint = endpoint
        self._lock = threading.Lock()

    @rpc_method
    def TrainStep(self, request_iterator, context):  # noqa: N802
        header, samples = None, []
        for chunk in request_iterator:
            if chunk.HasField("header"):
                if header is not None:
                    raise InvalidRequestError("TrainStep: a second header in one stream")
                header = chunk.header
                if not 0 < header.num_samples <= MAX_SAMPLES:
                    raise InvalidRequestError(f"TrainStep: num_samples must be in [1, {MAX_SAMPLES}], "
                                              f"got {header.num_samples}")
            elif header is None:
                raise InvalidRequestError("TrainStep: a sample before the header; send TrainStepHeader first")
            else:
                samples.append(convert.sample_from_proto(chunk.sample))
        if header is None or len(samples) != header.num_samples:
            raise InvalidRequestError(f"TrainStep: header announced {header.num_samples if header else '?'} "
                                      f"samples, got {len(samples)}")
        with self._lock:
            metrics = self.endpoint.train_step(samples)
        return trainer_pb2.TrainStepResponse(optimizer_steps=self.endpoint.optimizer_steps,
                                             metrics={k: float(v) for k, v in metrics.items() if v is not None})

    @rpc_method
    def PublishPolicy(self, request, context):  # noqa: N802
        if request.version < 0:
            raise InvalidRequestError(f"PublishPolicy: version must be >= 0, got {request.version}")
        start = time.perf_counter()
        with self._lock:
            size = self.endpoint.publish_policy(request.version)
        return trainer_pb2.PublishPolicyResponse(version=request.version, size_bytes=size,
                                                 seconds=time.perf_counter() - start)

    @rpc_method
    def SaveCheckpoint(self, request, context):  # noqa: N802
        directory = _save_target(request.directory)
        with self._lock:
            try:
                self.endpoint.save_checkpoint(directory)
            except OSError as exc:  # the request's directory cannot be written (ENOSPC keeps its own code)
                if exc.errno == errno.ENOSPC:
                    raise
                raise InvalidRequestError(f"SaveCheckpoint: cannot write {directory}: {exc}") from None
        return trainer_pb2.CheckpointResponse(directory=request.directory)

    @rpc_method
    def LoadCheckpoint(self, request, context):  # noqa: N802
        with self._lock:
            self.endpoint.load_checkpoint(_directory(request.directory))
        return trainer_pb2.CheckpointResponse(directory=request.directory)

    @rpc_method
    def Status(self, request, context):  # noqa: N802
        e = self.endpoint
        return trainer_pb2.TrainerStatusResponse(optimizer_steps=e.optimizer_steps,
                                                 last_published_version=e.last_published, workers=e.workers)


def _directory(value: str) -> Path:
    if not value:
        raise InvalidRequestError("CheckpointRequest.directory is empty; give a directory on the trainer's disk")
    return Path(value)


def _save_target(value: str) -> Path:
    """The directory SaveCheckpoint replaces as a whole: refuse a file (or device) and a non-empty directory
    that holds no checkpoint, which would be deleted."""
    path = _directory(value)
    try:
        if path.exists() and not path.is_dir():
            raise InvalidRequestError(f"SaveCheckpoint: {path} exists and is not a directory; give a checkpoint "
                                      "directory (it is replaced as a whole)")
        if path.is_dir() and not (path / META_FILE).is_file() and any(path.iterdir()):
            raise InvalidRequestError(f"SaveCheckpoint: {path} holds files but no checkpoint ({META_FILE}); "
                                      "refusing to replace it, give a new or checkpoint directory")
    except OSError as exc:
        raise InvalidRequestError(f"SaveCheckpoint: cannot use {path}: {exc}") from None
    return path


class RemoteTrainer(RemoteClient):
    """The controller's handle on a trainer service (same methods as TrainerEndpoint)."""

    stub_class = trainer_pb2_grpc.TrainerStub
    peer = "trainer service"
    default_timeout = 600.0

    def train_step(self, samples: list[Sample], step: int = 0) -> dict[str, float]:
        def stream() -> Iterator[trainer_pb2.TrainStepChunk]:
            yield trainer_pb2.TrainStepChunk(header=trainer_pb2.TrainStepHeader(step=step, num_samples=len(samples)))
            for s in samples:
                yield trainer_pb2.TrainStepChunk(sample=convert.sample_to_proto(s))

        reply = self._call("TrainStep", stream())
        return dict(reply.metrics)

    def publish_policy(self, version: int) -> int:
        reply = self._call("PublishPolicy", trainer_pb2.PublishPolicyRequest(version=version))
        return reply.size_bytes

    def save_checkpoint(self, directory: str | Path) -> None:
        self._call("SaveCheckpoint", trainer_pb2.CheckpointRequest(directory=str(Path(directory).resolve())))

    def load_checkpoint(self, directory: str | Path) -> None:
        self._call("LoadCheckpoint", trainer_pb2.CheckpointRequest(directory=str(Path(directory).resolve())))

    @property
    def optimizer_steps(self) -> int:
        return self._call("Status", trainer_pb2.TrainerStatusRequest(), timeout=30).optimizer_steps



