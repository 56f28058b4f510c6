"""The operator's planner loop for one RLJob: read progress, plan roles, move pods, write the status.

One :class:`Planner` per RLJob, ticked by the ``planner`` daemon in :mod:`tlt_operator.handlers`, which hands
it the API access, the status writer and the SetRole client (so this module holds no process-wide state).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from tlt.errors import ConfigError
from tlt_operator import planner, progress, resources
from tlt_operator.kube_api import Kube, object_path
from tlt_operator.resources import LABEL_COMPONENT, LABEL_JOB, LABEL_ROLE
from tlt_operator.role_setter import RoleSetError, RoleSetter
from tlt_operator.status import Condition, announce_outcome, condition_status, controller_outcome, now_iso, status_patch

log = logging.getLogger("tlt_operator")

WARNING_REPEAT_S = 60.0  # a failing pod gets at most one RoleChangeFailed Event per minute
# (namespace, name, fields, conditions, guard) -> (old status, patch): handlers.update_status
StatusWriter = Callable[[str, str, Mapping[str, Any], Iterable[Condition], Callable[[Mapping[str, Any]], bool]],
                        tuple[dict[str, Any], dict[str, Any]]]


def _pod_port(pod: Mapping[str, Any], annotation: str, default: int) -> int:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(annotation)
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _pod_ip(pod: Mapping[str, Any]) -> str | None:
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Running") or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    return status.get("podIP") or None


def _ordinal(pod_name: str) -> tuple[int, str]:
    tail = pod_name.rsplit("-", 1)[-1]
    return (int(tail), pod_name) if tail.isdigit() else (1 << 30, pod_name)


def _role_of(pod: Mapping[str, Any]) -> planner.Role:
    role = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_ROLE)
    return planner.DRAFTER if role == planner.DRAFTER else planner.ROLLOUT


@dataclass
class ClusterView:
    rollout_pods: dict[str, dict[str, Any]]
    controller_pod: dict[str, Any] | None
    controller_job: dict[str, Any] | None


def read_cluster(k: Kube, namespace: str, name: str) -> ClusterView:
    pods = k.list("Pod", namespace, {LABEL_JOB: name})
    rollout = {p["metadata"]["name"]: p for p in pods
               if (p["metadata"].get("labels") or {}).get(LABEL_COMPONENT) == "rollout"}
    controllers = [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_COMPONENT) == "controller"]
    # The running controller pod with an IP, newest first.
    controllers.sort(key=lambda p: (_pod_ip(p) is not None, p["metadata"].get("creationTimestamp") or "",
                                    p["metadata"]["name"]), reverse=True)
    job = k.get(object_path("Job", namespace, resources.controller_name(name)))
    return ClusterView(dict(sorted(rollout.items(), key=lambda kv: _ordinal(kv[0]))),
                       controllers[0] if controllers else None, job)


def _target(pod: Mapping[str, Any]) -> progress.Target:
    return progress.Target(pod["metadata"]["name"], _pod_ip(pod),
                           _pod_port(pod, resources.ANNOTATION_METRICS_PORT, resources.METRICS_PORT))


def _address(pod: Mapping[str, Any]) -> str:
    return f"{_pod_ip(pod)}:{_pod_port(pod, resources.ANNOTATION_GRPC_PORT, resources.GRPC_PORT)}"


def _why(new: planner.Role, worker: planner.WorkerProgress | None, progress_: planner.JobProgress,
         config: planner.PlannerConfig) -> str:
    if new == planner.DRAFTER:
        return "long tail" if progress_.phase == "rollout" else "policy update"
    if progress_.phase == "rollout" and progress_.pending_prompts > 0:
        return "new rollout"
    if worker is not None and not planner.is_idle(worker):
        return "new work"
    if not config.drafter_training:
        return "drafter training off"
    return f"{progress_.phase} phase"


def _planner_may_write(obj: Mapping[str, Any]) -> bool:
    """The planner writes status only for a running job whose current spec the handlers have reconciled."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if (obj.get("spec") or {}).get("suspend") or meta.get("deletionTimestamp"):
        return False
    if meta.get("generation") is not None and status.get("observedGeneration") != meta.get("generation"):
        return False
    return condition_status(status, "Failed") != ("True", "InvalidSpec")


class Planner:
    """One RLJob's planning loop state (only throttling lives in memory; roles live in the cluster)."""

    def __init__(self, body: kopf.Body, name: str, namespace: str, source: Any, *, kube: Callable[[], Kube],
                 write_status: StatusWriter, role_setter: RoleSetter, rpc_timeout: float) -> None:
        self.body = body
        self.name = name
        self.namespace = namespace
        self.source = source
        self.kube = kube
        self.write_status = write_status
        self.role_setter = role_setter
        self.rpc_timeout = rpc_timeout
        self.last_warning: dict[str, float] = {}

    def _warn_once(self, pod: str, reason: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last_warning.get(pod, -1e9) >= WARNING_REPEAT_S:
            self.last_warning[pod] = now
            kopf.event(self.body, type="Warning", reason=reason, message=message)

    async def _set_role(self, pod: Mapping[str, Any], role: str) -> str | None:
        """SetRole on the pod; the error message, or None on success."""
        try:
            await asyncio.to_thread(self.role_setter.set_role, _address(pod), role, self.rpc_timeout)
            return None
        except RoleSetError as exc:
            return str(exc)
        except Exception as exc:  # a broken setter must not stop the loop
            return f"{type(exc).__name__}: {exc}"

    async def _move(self, k: Kube, pod: dict[str, Any], old: str, new: str, why: str) -> bool:
        """Label first, then the RPC; a failed RPC puts the label back (the next tick tries again)."""
        pod_name = pod["metadata"]["name"]
        path = object_path("Pod", self.namespace, pod_name)
        await asyncio.to_thread(k.merge_patch, path, {"metadata": {"labels": {LABEL_ROLE: new}}})
        error = await self._set_role(pod, new)
        if error is not None:
            log.warning("%s/%s: %s", self.namespace, self.name, error)
            await asyncio.to_thread(k.merge_patch, path, {"metadata": {"labels": {LABEL_ROLE: old}}})
            self._warn_once(pod_name, "RoleChangeFailed", f"{pod_name}: {old} -> {new} failed: {error}")
            return False
        log.info("%s/%s: %s: %s -> %s (%s)", self.namespace, self.name, pod_name, old, new, why)
        kopf.event(self.body, type="Normal", reason="RoleChanged", message=f"{pod_name}: {old} -> {new} ({why})")
        return True

    async def tick(self) -> None:
        body = self.body
        spec = body.get("spec") or {}
        if not _planner_may_write(body):
            return
        try:
            job_spec = resources.validate_spec(spec)
        except ConfigError:
            return
        k = self.kube()
        view = await asyncio.to_thread(read_cluster, k, self.namespace, self.name)
        fields: dict[str, Any] = {}
        conditions: list[Condition] = []
        roles = {pod: _role_of(p) for pod, p in view.rollout_pods.items()}
        outcome, outcome_message = controller_outcome(view.controller_job)

        if outcome is None:
            controller = _target(view.controller_pod) if view.controller_pod else None
            snapshot = await self.source.read(self.namespace, self.name, controller,
                                              [_target(p) for p in view.rollout_pods.values()])
            job_progress = snapshot.progress()
            if job_progress is not None:
                await self._plan(k, view, snapshot, job_progress, job_spec, roles, fields, conditions)
            fields["phase"] = "Running"
            conditions += [("Complete", "False", "NotFinished", "the controller Job has not finished"),
                           ("Failed", "False", "SpecValid", "the spec is valid")]
        else:
            fields["phase"] = outcome
            conditions.append(("LongTail", "False", outcome, "the controller Job has finished"))
            if outcome == "Complete":
                conditions.append(("Complete", "True", "ControllerSucceeded", outcome_message))
            else:
                conditions.append(("Failed", "True", "ControllerFailed", outcome_message))

        drafters = [pod for pod, role in roles.items() if role == planner.DRAFTER]
        fields.update(roles=roles, drafterPods=len(drafters))
        conditions.append(("DrafterTraining", "True", "IdlePodsTraining",
                           f"{len(drafters)} pod(s) train the drafter: {', '.join(drafters)}") if drafters else
                          ("DrafterTraining", "False", "NoDrafterPods", "no pod trains the drafter"))
        if not status_patch(body.get("status") or {}, fields, conditions, now_iso()):
            return  # nothing new: no API call
        old, patch = await asyncio.to_thread(self.write_status, self.namespace, self.name, fields, conditions,
                                             _planner_may_write)
        announce_outcome(body, old, patch, outcome_message)

    async def _plan(self, k: Kube, view: ClusterView, snapshot: progress.Snapshot, job_progress: planner.JobProgress,
                    job_spec: Any, roles: dict[str, planner.Role], fields: dict[str, Any],
                    conditions: list[Condition]) -> None:
        config = planner.PlannerConfig(drafter_training=job_spec.drafter.online_training,
                                       min_responses=job_spec.drafter.min_responses,
                                       train_during_update=job_spec.drafter.train_during_update)
        desired = planner.plan_roles(job_progress, config)
        workers = {w.name: w for w in job_progress.workers}
        healthy = {w.name for w in job_progress.workers if w.healthy}
        # Unknown (unreachable) pods keep their role: no move on a guess.
        changes = [(pod, old, new) for pod, old, new in planner.role_changes(roles, desired) if pod in healthy]
        moved = await asyncio.gather(*(
            self._move(k, view.rollout_pods[pod], old, new, _why(new, workers.get(pod), job_progress, config))
            for pod, old, new in changes))
        for (pod, _old, new), ok in zip(changes, moved):
            if ok:
                roles[pod] = new
        # A worker that reports another role than its label (restarted, missed RPC) is told again.
        changed = {pod for pod, _, _ in changes}
        for pod in sorted(healthy - changed):
            metrics = snapshot.workers.get(pod)
            if metrics is not None and metrics.role in (planner.ROLLOUT, planner.DRAFTER) \
                    and metrics.role != roles[pod]:
                error = await self._set_role(view.rollout_pods[pod], roles[pod])
                if error is None:
                    log.info("%s/%s: %s reported role %s; told it %s again", self.namespace, self.name, pod,
                             metrics.role, roles[pod])
                else:
                    self._warn_once(pod, "RoleChangeFailed", f"{pod}: SetRole({roles[pod]}) failed: {error}")

        controller = snapshot.controller
        assert controller is not None
        long_tail = planner.in_long_tail(job_progress)
        idle = sorted(w.name for w in job_progress.workers if w.healthy and planner.is_idle(w))
        conditions.append(("LongTail", "True", "IdleWorkers",
                           f"rollout phase, nothing pending, idle: {', '.join(idle)}") if long_tail else
                          ("LongTail", "False", "NoTail",
                           f"{job_progress.phase} phase, {job_progress.pending_prompts} pending requests"))
        known = [m for m in snapshot.workers.values() if m is not None]
        policy = controller.policy_version if controller.policy_version is not None else \
            max((m.policy_version for m in known if m.policy_version is not None), default=None)
        drafter = controller.drafter_version if controller.drafter_version is not None else \
            max((m.drafter_version for m in known if m.drafter_version is not None), default=None)
        fields["step"] = controller.step
        if policy is not None:
            fields["policyVersion"] = policy
        if drafter is not None:
            fields["drafterVersion"] = drafter
        if controller.acceptance_length is not None:
            fields["acceptanceLength"] = round(controller.acceptance_length, 4)
