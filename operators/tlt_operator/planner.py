"""The role planner: rollout progress in, a role per worker out. Pure, so the local controller and the
Kubernetes operator run exactly the same decision.

Roles: ``rollout`` (decoding or ready to decode) and ``drafter`` (training its drafter copy on its own
finished responses). A worker is moved to ``drafter`` only in the long tail: it has nothing running,
nothing queued locally, no prompt waits in the global queue, and it holds enough finished responses
to train on. Any new work (a re-dispatched request, the next rollout) moves it back at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Role = Literal["rollout", "drafter"]
Phase = Literal["rollout", "update", "idle"]
ROLLOUT: Role = "rollout"
DRAFTER: Role = "drafter"


@dataclass(frozen=True)
class WorkerProgress:
    """What one rollout worker reports (from its metrics or its Progress RPC)."""

    name: str
    running: int
    queued: int
    finished: int
    buffered_responses: int
    healthy: bool = True


@dataclass(frozen=True)
class JobProgress:
    """The job's phase, prompts not yet handed to any worker, and every worker's progress."""

    phase: Phase
    pending_prompts: int
    workers: tuple[WorkerProgress, ...]


@dataclass(frozen=True)
class PlannerConfig:
    """``train_during_update``: keep idle workers on the drafter while the policy update runs (true on a
    cluster, where the trainer has its own pods; false where workers and trainer share the same cores)."""

    drafter_training: bool = True
    min_responses: int = 4
    train_during_update: bool = False
    max_drafter_workers: int | None = None


def is_idle(worker: WorkerProgress) -> bool:
    return worker.running == 0 and worker.queued == 0


def in_long_tail(progress: JobProgress) -> bool:
    """True while the rollout runs, no prompt waits, and some healthy worker already has nothing to do."""
    if progress.phase != "rollout" or progress.pending_prompts > 0:
        return False
    healthy = [w for w in progress.workers if w.healthy]
    return any(is_idle(w) for w in healthy) and any(not is_idle(w) for w in healthy)


def plan_roles(progress: JobProgress, config: PlannerConfig) -> dict[str, Role]:
    """A role for every worker: ``drafter`` for idle workers in the long tail (or during the policy update
    when allowed), ``rollout`` otherwise. Among eligible workers the ones holding most responses go first."""
    roles: dict[str, Role] = {w.name: ROLLOUT for w in progress.workers}
    if not config.drafter_training:
        return roles
    if progress.phase == "rollout":
        if progress.pending_prompts > 0:
            return roles
    elif not (progress.phase == "update" and config.train_during_update):
        return roles
    eligible = [w for w in progress.workers
                if w.healthy and is_idle(w) and w.buffered_responses >= config.min_responses]
    eligible.sort(key=lambda w: (-w.buffered_responses, w.name))
    limit = len(eligible) if config.max_drafter_workers is None else config.max_drafter_workers
    for worker in eligible[:limit]:
        roles[worker.name] = DRAFTER
    return roles


def role_changes(before: Mapping[str, Role], after: Mapping[str, Role]) -> list[tuple[str, Role, Role]]:
    """(worker, old role, new role) for every worker whose role differs; new workers count as from rollout."""
    return [(name, before.get(name, ROLLOUT), role) for name, role in sorted(after.items())
            if before.get(name, ROLLOUT) != role]
