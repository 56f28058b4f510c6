"""The controller's view of the job's services: rollout workers, the drafter aggregator and the policy
trainer, either built in this process (``--inproc``) or reached over gRPC. Both give objects with the
same methods, so the step loop does not know which it drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tlt.config import JobSpec
from tlt.rpc.tls import ClientTLS
from tlt.store import ArtifactStore


@dataclass(frozen=True)
class ServiceAddresses:
    """Where the services listen (``host:port``), and how to reach them: TLS with ``tls``, else plaintext."""

    rollout: tuple[str, ...]
    drafter: str | None
    trainer: str
    tls: ClientTLS | None = None


@dataclass
class Services:
    """Handles on the job's services; ``close()`` releases connections / in-process resources."""

    workers: list
    drafter: object | None  # DrafterAggregator or RemoteDrafter
    trainer: object  # TrainerEndpoint or RemoteTrainer
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()


def build_inproc(spec: JobSpec, model_dir: Path, store: ArtifactStore) -> Services:
    """Everything in this process: worker threads, the aggregator and the trainer share the store."""
    from tlt.drafter.service import open_aggregator
    from tlt.models.drafter_io import drafter_inference_dtype
    from tlt.models.loader import load_model, resolve_device
    from tlt.rollout.worker import RolloutWorker
    from tlt.trainer.service import TrainerEndpoint

    if spec.rollout.backend == "vllm":
        from tlt.rollout.backends.vllm import check_engines_can_share_process

        check_engines_can_share_process(spec.rollout.workers)  # before anything loads
    trainer = TrainerEndpoint(spec, model_dir, store)
    aggregator = None
    if spec.rollout.speculative.mode != "off":
        aggregator = open_aggregator(spec, model_dir, trainer.trainer.model, store)
    workers, closers = [], [trainer.close]
    device = resolve_device(spec.model.device)
    for i in range(spec.rollout.workers):
        if spec.rollout.backend == "vllm":  # vLLM runs the policy in its own process; it does not train the drafter
            from tlt.rollout.backends.vllm import VllmRolloutWorker, export_drafter

            name = f"rollout-{i}"
            drafter_dir = (export_drafter(aggregator.drafter, Path(spec.output_dir) / "cache" / name / "drafter")
                           if aggregator else None)
            worker = VllmRolloutWorker(name, model_dir, spec, store, drafter_dir=drafter_dir)
            workers.append(worker)
            closers.append(worker.close)
            continue
        model = load_model(model_dir, dtype=spec.model.dtype, device=device)
        drafter = None
        if aggregator:
            drafter = aggregator.drafter.copy_for(model).to(device=model.device, dtype=drafter_inference_dtype(model))
            drafter.eval()
        workers.append(RolloutWorker(f"rollout-{i}", model, spec, drafter, store,
                                     push_delta=aggregator.push_delta if aggregator else None,
                                     drafter_base=aggregator.base if aggregator else None))
    return Services(workers, aggregator, trainer, closers)


def connect(addresses: ServiceAddresses, timeout: float = 120.0) -> Services:
    """gRPC handles on running services (waits until each reports SERVING); over TLS when ``addresses.tls``."""
    from tlt.drafter.service import RemoteDrafter
    from tlt.rollout.service import RemoteRolloutWorker
    from tlt.rpc.client import open_channel, wait_ready
    from tlt.trainer.service import RemoteTrainer

    tls = addresses.tls
    trainer = RemoteTrainer(addresses.trainer, tls=tls)
    trainer.wait_ready(timeout)
    drafter = None
    if addresses.drafter:
        drafter = RemoteDrafter(addresses.drafter, tls=tls)
        drafter.wait_ready(timeout)
    workers = []
    for address in addresses.rollout:
        with open_channel(address, tls) as channel:  # the handle asks the worker for its progress at once
            wait_ready(channel, address, timeout)
        workers.append(RemoteRolloutWorker(address, tls=tls))
    handles = [trainer, *([drafter] if drafter else []), *workers]
    return Services(workers, drafter, trainer, [h.close for h in handles])
