"""The drafter-training service's core: merges weight deltas pushed by spot trainers and publishes versions.

Each spot trainer starts from a published version, trains its own copy, and pushes the change since its
last push (a *delta*) together with the number of target tokens it trained on. At :meth:`publish` the
aggregator sums each worker's deltas (they are sequential increments of one trajectory), averages the
workers' sums weighted by tokens (parallel trajectories from a common start, as in local SGD), applies
``outer_lr`` times that to the master weights and publishes the result as the next drafter version.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tlt.errors import InvalidRequestError
from tlt.models.drafter import Eagle3Drafter
from tlt.models.drafter_io import save_drafter
from tlt.store import VersionNotFoundError
from tlt.store.kinds import DRAFTER_KIND

PUBLISH_DTYPE = torch.bfloat16  # what publish_drafter writes


def trainable_state(drafter: Eagle3Drafter) -> dict[str, torch.Tensor]:
    """Detached fp32 copies of the drafter's trainable weights, by parameter name."""
    return {name: p.detach().float().clone() for name, p in drafter.named_parameters()}


@dataclass
class _Pending:
    delta: dict[str, torch.Tensor]
    tokens: int = 0
    pushes: int = 0


@dataclass
class AggregatorStatus:
    """What the aggregator has published and what waits to be merged."""

    version: int
    pending_workers: int
    pending_tokens: int
    total_pushes: int
    total_tokens: int
    published: list[int] = field(default_factory=list)


class DrafterAggregator:
    """Owns the master drafter; thread-safe.

    Args:
        drafter: the master drafter (its weights are updated in place; fp32 recommended).
        store: an ArtifactStore to publish versions to (None: keep versions in memory only).
        version: the version ``drafter`` currently holds.
        outer_lr: scale of the merged delta (1.0 = plain token-weighted averaging).
    """

    def __init__(self, drafter: Eagle3Drafter, store=None, version: int = 0, outer_lr: float = 1.0) -> None:
        self.drafter = drafter
        self.store = store
        self.version = version
        self.outer_lr = outer_lr
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._names = {name for name, _ in drafter.named_parameters()}
        self._status = AggregatorStatus(version, 0, 0, 0, 0)

    def base(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The current version and a copy of its weights (where a spot trainer starts)."""
        with self._lock:
            return self.version, trainable_state(self.drafter)

    def push_delta(self, worker: str, delta: dict[str, torch.Tensor], tokens: int,
                   base_version: int | None = None) -> None:
        """Queue a worker's weight change; validated so a bad push never corrupts the master.

        ``base_version`` is the published version the delta was computed against (None: not checked). Older
        versions are fine (training is asynchronous); a newer one was never published, so the push is refused,
        whatever the delta holds. A delta is refused if it holds NaN or inf, or if the worker's pending sum with
        it, applied to the master, would leave a weight that is not finite in the published (bf16) checkpoint:
        the merge is a token-weighted average of the workers' sums, so when each of them applied alone stays
        finite, so does the merge.
        """
        if tokens <= 0:
            raise InvalidRequestError(f"push from {worker}: tokens must be > 0, got {tokens}")
        if base_version is not None and base_version < 0:
            raise InvalidRequestError(f"push from {worker}: base_version must be >= 0, got {base_version}")
        self._check_base(worker, base_version)
        if set(delta) != self._names:
            missing, extra = sorted(self._names - set(delta)), sorted(set(delta) - self._names)
            raise InvalidRequestError(f"push from {worker}: delta tensors do not match the drafter "
                                      f"(missing {missing[:3]}, unexpected {extra[:3]})")
        params = dict(self.drafter.named_parameters())
        for name, value in delta.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise InvalidRequestError(f"push from {worker}: {name} has shape {tuple(value.shape)}, "
                                          f"expected {tuple(params[name].shape)}")
            if not torch.isfinite(value).all():
                raise InvalidRequestError(f"push from {worker}: {name} holds NaN or inf; push refused")
        with self._lock:
            pending = self._pending.get(worker)
            sums = {name: (pending.delta[name] if pending else 0) + value.float() for name, value in delta.items()}
            with torch.no_grad():
                for name, total in sums.items():
                    applied = (params[name].detach().float() + self.outer_lr * total).to(PUBLISH_DTYPE)
                    if not torch.isfinite(total).all() or not torch.isfinite(applied).all():
                        raise InvalidRequestError(
                            f"push from {worker}: {name} would overflow: with this delta the worker's pending "
                            f"change no longer fits the published {PUBLISH_DTYPE} drafter; push refused (its "
                            f"earlier pushes stay pending)")
            if pending is None:
                pending = self._pending[worker] = _Pending(sums)
            else:
                pending.delta = sums
            pending.tokens += tokens
            pending.pushes += 1
            self._status.total_pushes += 1
            self._status.total_tokens += tokens

    def _check_base(self, worker: str, base_version: int | None) -> None:
        if base_version is not None and base_version > self.version:
            raise VersionNotFoundError(
                f"push from {worker}: base_version {base_version} is newer than the latest drafter version "
                f"{self.version}; compute deltas from a published version (LatestVersion)")

    def status(self) -> AggregatorStatus:
        with self._lock:
            return AggregatorStatus(self.version, len(self._pending), sum(p.tokens for p in self._pending.values()),
                                    self._status.total_pushes, self._status.total_tokens,
                                    list(self._status.published))

    def publish(self, metadata: dict | None = None) -> int | None:
        """Merge everything pushed since the last publish into a new version; None if nothing was pushed."""
        with self._lock:
            if not self._pending:
                return None
            pending, self._pending = self._pending, {}
            total = sum(p.tokens for p in pending.values())
            params = dict(self.drafter.named_parameters())
            with torch.no_grad():
                for name, param in params.items():
                    merged = sum(p.delta[name] * (p.tokens / total) for p in pending.values())
                    param.add_((self.outer_lr * merged).to(param.dtype))
            self.version += 1
            version = self.version
            self._status.published.append(version)
            info = {"tokens": total, "workers": sorted(pending), "pushes": sum(p.pushes for p in pending.values()),
                    **(metadata or {})}
            if self.store is not None:
                publish_drafter(self.store, self.drafter, version, info)
            return version


def publish_drafter(store, drafter: Eagle3Drafter, version: int, metadata: dict | None = None) -> None:
    """Write ``drafter`` as an EAGLE-3 checkpoint (:data:`PUBLISH_DTYPE`) and publish it as ``version``."""
    with tempfile.TemporaryDirectory(prefix="tlt-drafter-") as tmp:
        save_drafter(drafter, tmp, dtype=PUBLISH_DTYPE)
        files = {p.name: p for p in Path(tmp).iterdir()}
        store.publish(DRAFTER_KIND, version, files, metadata=metadata or {})
