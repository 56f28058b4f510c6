"""The RLJob operator (kopf): children, suspend/resume, cleanup, status, and long-tail role moves.

Run it with ``python -m tlt_operator`` (or ``kopf run -m tlt_operator.handlers``).

* create / resume / update of ``spec``: validate ``spec`` (``spec.job`` with ``tlt.config.job_spec_from_dict``),
  then server-side-apply every child from :func:`tlt_operator.resources.build_children` (create on 404). An
  invalid spec sets ``phase: Failed`` and the conditions ``Failed``/``Ready`` (reason ``InvalidSpec``, the
  message names the field), posts a Warning Event and fails the handler permanently (no retry; the next
  ``spec`` edit is handled again). ``spec.suspend`` renders replicas 0 and a suspended controller Job.
* delete: the finalizer ``tlt.dev/finalizer`` keeps the RLJob until its children are deleted.
* the ``planner`` daemon, every ``spec.planner.intervalSeconds`` (default 1 s): reads the controller's and the
  rollout pods' metrics (:mod:`tlt_operator.progress`), runs the shared planner, moves the roles (pod label
  ``tlt.dev/role``, then the ``SetRole`` RPC, then a ``RoleChanged`` Event) and writes the status.

Everything the operator needs to remember lives in the cluster (pod labels, the RLJob's status and kopf's
annotations), so any replica can take over: run several with kopf peering (the default without
``--standalone``), and only one of them is active.

Environment: ``TLT_OPERATOR_KUBE_SERVER`` (an API server URL used without credentials, e.g. ``kubectl proxy``;
default: in-cluster or kubeconfig login), ``TLT_OPERATOR_DISABLE_SCANNING=1`` (no namespace/CRD watching, e.g.
without permission to list them), ``TLT_PROMETHEUS_URL`` (+ ``TLT_PROMETHEUS_NAMESPACE_LABEL``,
``TLT_PROMETHEUS_POD_LABEL``), ``TLT_OPERATOR_METRICS_TIMEOUT`` (s, default 1), ``TLT_OPERATOR_RPC_TIMEOUT``
(s, default 5).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from tlt.errors import ConfigError
from tlt_operator import planner, progress, resources
from tlt_operator.resources import GROUP, LABEL_COMPONENT, LABEL_JOB, LABEL_ROLE, PLURAL, VERSION
from tlt_operator.role_setter import GrpcRoleSetter, RoleSetError, RoleSetter

log = logging.getLogger("tlt_operator")

FIELD_MANAGER = "tlt-operator"
FINALIZER = "tlt.dev/finalizer"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
WARNING_REPEAT_S = 60.0  # a failing pod gets at most one RoleChangeFailed Event per minute


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class OperatorOptions:
    """Process-wide knobs (from the environment; tests set them directly)."""

    kube_server: str | None = None
    disable_scanning: bool = False
    prometheus_url: str | None = None
    prometheus_namespace_label: str = "namespace"
    prometheus_pod_label: str = "pod"
    metrics_timeout: float = progress.DEFAULT_TIMEOUT_S
    rpc_timeout: float = 5.0
    role_setter: RoleSetter = field(default_factory=GrpcRoleSetter)

    @classmethod
    def from_env(cls) -> OperatorOptions:
        env = os.environ
        return cls(
            kube_server=env.get("TLT_OPERATOR_KUBE_SERVER") or None,
            disable_scanning=env.get("TLT_OPERATOR_DISABLE_SCANNING", "").lower() in ("1", "true", "yes"),
            prometheus_url=env.get("TLT_PROMETHEUS_URL") or None,
            prometheus_namespace_label=env.get("TLT_PROMETHEUS_NAMESPACE_LABEL", "namespace"),
            prometheus_pod_label=env.get("TLT_PROMETHEUS_POD_LABEL", "pod"),
            metrics_timeout=_env_float("TLT_OPERATOR_METRICS_TIMEOUT", progress.DEFAULT_TIMEOUT_S),
            rpc_timeout=_env_float("TLT_OPERATOR_RPC_TIMEOUT", 5.0),
        )


OPTIONS = OperatorOptions.from_env()


# ---- Kubernetes API access (plain JSON over the kubernetes client's configured connection) -----------

_PATHS = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Job": ("/apis/batch/v1", "jobs"),
    "RLJob": (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


def collection_path(kind: str, namespace: str) -> str:
    prefix, plural = _PATHS[kind]
    return f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(kind: str, namespace: str, name: str) -> str:
    return f"{collection_path(kind, namespace)}/{name}"


class Kube:
    """Raw JSON requests through a ``kubernetes.client.ApiClient`` (auth, TLS, token refresh are its job).

    Plain dicts in and out: no typed models, so partial objects (and API emulators) round-trip unchanged.
    """

    def __init__(self, api_client: ApiClient, timeout: float = 30.0) -> None:
        self.api = api_client
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, query: Iterable[tuple[str, str]] = (),
                content_type: str = "application/json") -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(method=method, resource_path=path, query_params=list(query),
                                           header_params=headers, body=body, auth_settings=["BearerToken"])
        reply = self.api.call_api(*request, _request_timeout=self.timeout)
        data = reply.read()
        if not 200 <= reply.status <= 299:
            raise ApiException.from_response(http_resp=reply, body=data.decode(errors="replace"), data=None)
        return json.loads(data) if data else None

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, label_selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """Objects matching ``label_selector`` (also filtered here: some API emulators ignore selectors)."""
        selector = ",".join(f"{k}={v}" for k, v in label_selector.items())
        reply = self.request("GET", collection_path(kind, namespace), query=[("labelSelector", selector)])
        items = (reply or {}).get("items") or []
        return [o for o in items if all(((o.get("metadata") or {}).get("labels") or {}).get(k) == v
                                        for k, v in label_selector.items())]

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return self.request("PATCH", path, body=patch, content_type=MERGE)

    def create(self, obj: Mapping[str, Any]) -> Any:
        meta = obj["metadata"]
        return self.request("POST", collection_path(obj["kind"], meta["namespace"]), body=obj,
                            query=[("fieldManager", FIELD_MANAGER)])

    def apply(self, obj: Mapping[str, Any]) -> Any:
        """Server-side apply (fields we stop rendering are removed); create when the server reports 404."""
        meta = obj["metadata"]
        path = object_path(obj["kind"], meta["namespace"], meta["name"])
        try:
            return self.request("PATCH", path, body=obj, content_type=APPLY,
                                query=[("fieldManager", FIELD_MANAGER), ("force", "true")])
        except ApiException as exc:
            if exc.status != 404:
                raise
        return self.create(obj)

    def delete(self, path: str) -> bool:
        try:
            self.request("DELETE", path, query=[("propagationPolicy", "Background")])
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise


_KUBE: Kube | None = None


def kube() -> Kube:
    if _KUBE is None:
        raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
    return _KUBE


def api_client_for(server: str) -> ApiClient:
    config = Configuration()
    config.host = server.rstrip("/")
    config.verify_ssl = False
    return ApiClient(config)


# ---- status -----------------------------------------------------------------------------------------

CONDITION_TYPES = ("Ready", "LongTail", "DrafterTraining", "Suspended", "Complete", "Failed")
Condition = tuple[str, str, str, str]  # type, status, reason, message


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: Iterable[Mapping[str, Any]], condition: Condition, now: str) -> list[dict[str, Any]]:
    """The conditions with ``condition`` set; lastTransitionTime changes only when the status does."""
    type_, status, reason, message = condition
    out = [dict(c) for c in conditions]
    for c in out:
        if c.get("type") == type_:
            if c.get("status") != status:
                c["lastTransitionTime"] = now
            c.update(status=status, reason=reason, message=message)
            break
    else:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": now})
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c.get("type"), len(order)))


def status_patch(old: Mapping[str, Any], fields: Mapping[str, Any], conditions: Iterable[Condition],
                 now: str) -> dict[str, Any]:
    """The merge patch turning status ``old`` into one with ``fields`` and ``conditions`` (empty: no change)."""
    patch: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "roles":
            before = old.get("roles") or {}
            if dict(before) != dict(value):
                patch["roles"] = {**{k: None for k in before if k not in value}, **value}
        elif old.get(key) != value:
            patch[key] = value
    before = [dict(c) for c in old.get("conditions") or []]
    after = before
    for condition in conditions:
        after = set_condition(after, condition, now)
    if after != before:
        patch["conditions"] = after
    return patch


_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _job_lock(namespace: str, name: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault((namespace, name), threading.Lock())


def update_status(namespace: str, name: str, fields: Mapping[str, Any], conditions: Iterable[Condition] = (),
                  guard: Callable[[Mapping[str, Any]], bool] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read-modify-write of the RLJob status (serialised per job in this process; the conditions list is
    replaced as a whole). ``guard(fresh object)`` false skips the write. Returns (old status, patch)."""
    k = kube()
    path = object_path("RLJob", namespace, name)
    with _job_lock(namespace, name):
        obj = k.get(path)
        if obj is None or (guard is not None and not guard(obj)):
            return {}, {}
        old = obj.get("status") or {}
        patch = status_patch(old, fields, list(conditions), now_iso())
        if patch:
            k.merge_patch(f"{path}/status", {"status": patch})
        return old, patch


def condition_status(status: Mapping[str, Any], type_: str) -> tuple[str | None, str | None]:
    for c in status.get("conditions") or []:
        if c.get("type") == type_:
            return c.get("status"), c.get("reason")
    return None, None


def announce_outcome(body: Mapping[str, Any], old: Mapping[str, Any], patch: Mapping[str, Any],
                     message: str) -> None:
    """Post the Event for a status write that moved the phase to Complete or Failed (controller outcome).

    Both writers call this (the handlers' reconcile and the planner daemon): whichever of them sees the
    finished Job first writes the phase, and the other then finds nothing new, so the Event must go with the write.
    """
    phase = patch.get("phase", old.get("phase"))
    if phase == "Complete" and old.get("phase") != "Complete":
        kopf.event(body, type="Normal", reason="Complete", message=message)
    # Failed may already be the phase for an invalid spec; the controller's failure is news all the same.
    elif phase == "Failed" and patch and condition_status(old, "Failed") != ("True", "ControllerFailed"):
        kopf.event(body, type="Warning", reason="ControllerFailed", message=message)


def controller_outcome(job: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """("Complete" | "Failed" | None, message) from the controller Job's status."""
    if not job:
        return None, ""
    status = job.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "Complete", c.get("message") or "the controller Job succeeded"
        if c.get("status") == "True" and c.get("type") in ("Failed", "FailureTarget"):
            return "Failed", c.get("message") or c.get("reason") or "the controller Job failed"
    if status.get("succeeded"):
        return "Complete", "the controller Job succeeded"
    return None, ""


# ---- reconcile (create / resume / update) -----------------------------------------------------------


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in body.items()})


def _ensure_job(k: Kube, job: Mapping[str, Any]) -> None:
    """Apply the controller Job; its pod template is immutable, so a changed one means delete + create
    (an unfinished controller is restarted with the new template; a completed one is left alone)."""
    meta = job["metadata"]
    path = object_path("Job", meta["namespace"], meta["name"])
    existing = k.get(path)
    if existing is not None:
        want = meta["annotations"][resources.ANNOTATION_CONFIG_HASH]
        have = ((existing.get("metadata") or {}).get("annotations") or {}).get(resources.ANNOTATION_CONFIG_HASH)
        if have != want and not (existing.get("metadata") or {}).get("deletionTimestamp"):
            if controller_outcome(existing)[0] == "Complete":
                log.info("%s: the controller Job has completed; not rolling it", meta["name"])
                return
            log.info("%s: the controller pod template changed; recreating the Job", meta["name"])
            k.delete(path)
            existing = None
        elif have != want:
            existing = None
    if existing is None:
        try:
            k.create(job)
        except ApiException as exc:
            if exc.status == 409:  # the old Job is still being deleted
                raise kopf.TemporaryError("waiting for the old controller Job to be deleted", delay=2) from None
            raise
        return
    k.apply(job)


def reconcile(body: Mapping[str, Any], cause: str) -> None:
    rljob = _plain(body)
    meta = rljob.get("metadata") or {}
    name, namespace = meta["name"], meta.get("namespace") or "default"
    generation = meta.get("generation")
    gen_field = {"observedGeneration": generation} if generation is not None else {}
    spec = rljob.get("spec") or {}
    try:
        resources.validate_spec(spec)
    except ConfigError as exc:
        message = str(exc)
        log.warning("%s/%s: invalid spec: %s", namespace, name, message)
        update_status(namespace, name, {"phase": "Failed", **gen_field},
                      [("Ready", "False", "InvalidSpec", message), ("Failed", "True", "InvalidSpec", message)])
        kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
        raise kopf.PermanentError(f"invalid spec: {message}") from None

    k = kube()
    children = resources.build_children(rljob)
    for child in children:
        if child["kind"] == "Job":
            _ensure_job(k, child)
        else:
            k.apply(child)

    suspended = bool(spec.get("suspend", False))
    outcome, outcome_message = controller_outcome(k.get(object_path("Job", namespace, resources.controller_name(name))))
    fields: dict[str, Any] = dict(gen_field)
    conditions: list[Condition] = []
    if suspended:
        fields.update(phase="Suspended", roles={}, drafterPods=0)
        conditions += [("Ready", "False", "Suspended", "spec.suspend is true: workloads scaled to 0"),
                       ("Suspended", "True", "Suspended", "spec.suspend is true"),
                       ("LongTail", "False", "Suspended", "suspended"),
                       ("DrafterTraining", "False", "Suspended", "suspended")]
    else:
        fields["phase"] = outcome or "Running"
        conditions += [("Ready", "True", "Reconciled", f"{len(children)} children up to date"),
                       ("Suspended", "False", "Running", "spec.suspend is false")]
    if outcome == "Failed":
        conditions.append(("Failed", "True", "ControllerFailed", outcome_message))
    else:
        conditions.append(("Failed", "False", "SpecValid", "the spec is valid"))
    conditions.append(("Complete", "True" if outcome == "Complete" else "False",
                       "ControllerSucceeded" if outcome == "Complete" else "NotFinished",
                       outcome_message if outcome == "Complete" else "the controller Job has not finished"))
    old, patch = update_status(namespace, name, fields, conditions)
    announce_outcome(body, old, patch, outcome_message)

    was_suspended = condition_status(old, "Suspended")[0] == "True"
    if cause == "create":
        kopf.event(body, type="Normal", reason="Created",
                   message=f"created {len(children)} children ({'suspended' if suspended else 'running'})")
    if suspended and not was_suspended:
        kopf.event(body, type="Normal", reason="Suspended", message="scaled to 0 and suspended the controller Job")
    elif not suspended and was_suspended:
        kopf.event(body, type="Normal", reason="Resumed", message="workloads scaled up, controller Job resumed")
    if condition_status(old, "Failed") == ("True", "InvalidSpec"):
        kopf.event(body, type="Normal", reason="SpecValid", message="the spec is valid again; children reconciled")


# ---- kopf wiring --------------------------------------------------------------------------------------


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP,
                                                                            key="last-handled-configuration")
    settings.posting.enabled = True
    settings.posting.reporting_component = FIELD_MANAGER
    settings.posting.reporting_instance = os.environ.get("POD_NAME") or socket.gethostname()
    settings.posting.event_name_prefix = f"{FIELD_MANAGER}-"
    settings.scanning.disabled = OPTIONS.disable_scanning
    settings.watching.server_timeout = 300
    # Peering: left at kopf's defaults (name "default", auto-detected; `--standalone` turns it off).


@kopf.on.login()
def login(logger: Any, **kwargs: Any) -> kopf.ConnectionInfo | None:
    global _KUBE
    if OPTIONS.kube_server:
        _KUBE = Kube(api_client_for(OPTIONS.kube_server))
        return kopf.ConnectionInfo(server=OPTIONS.kube_server.rstrip("/"), insecure=True)
    info = kopf.login_via_client(logger=logger, **kwargs)  # in-cluster service account, else kubeconfig
    _KUBE = Kube(ApiClient())  # the default configuration that login just loaded (with token refresh)
    return info


@kopf.on.create(GROUP, VERSION, PLURAL, id="create")
def on_create(body: kopf.Body, **_: Any) -> None:
    reconcile(body, "create")


@kopf.on.resume(GROUP, VERSION, PLURAL, id="resume")
def on_resume(body: kopf.Body, **_: Any) -> None:
    reconcile(body, "resume")


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", id="update")
def on_update(body: kopf.Body, **_: Any) -> None:
    reconcile(body, "update")


@kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup")
def on_delete(body: kopf.Body, name: str, namespace: str, **_: Any) -> None:
    """Delete the children explicitly (garbage collection would too; this does not wait for it)."""
    k = kube()
    uid = (body.get("metadata") or {}).get("uid")
    deleted = []
    for _api_version, kind, child in reversed(resources.child_refs(name)):
        path = object_path(kind, namespace, child)
        obj = k.get(path)
        if obj is None:
            continue
        owners = (obj.get("metadata") or {}).get("ownerReferences") or []
        if uid and not any(o.get("uid") == uid for o in owners):
            log.warning("%s/%s: %s %s is not owned by this RLJob; leaving it", namespace, name, kind, child)
            continue
        if k.delete(path):
            deleted.append(f"{kind}/{child}")
    log.info("%s/%s: deleted %s", namespace, name, ", ".join(deleted) or "nothing")


# ---- the planner daemon -----------------------------------------------------------------------------


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

    def __init__(self, body: kopf.Body, name: str, namespace: str, source: Any) -> None:
        self.body = body
        self.name = name
        self.namespace = namespace
        self.source = source
        self.last_warning: dict[str, float] = {}

    def _warn_once(self, pod: str, reason: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last_warning.get(pod, -1e9) >= WARNING_REPEAT_S:
            self.last_warning[pod] = now
            kopf.event(self.body, type="Warning", reason=reason, message=message)

    async def _set_role(self, pod: Mapping[str, Any], role: str) -> str | None:
        """SetRole on the pod; the error message, or None on success."""
        try:
            await asyncio.to_thread(OPTIONS.role_setter.set_role, _address(pod), role, OPTIONS.rpc_timeout)
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
        k = kube()
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
        old, patch = await asyncio.to_thread(update_status, self.namespace, self.name, fields, conditions,
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


def make_source(session: aiohttp.ClientSession) -> Any:
    if OPTIONS.prometheus_url:
        return progress.PrometheusSource(session, OPTIONS.prometheus_url, max(2.0, OPTIONS.metrics_timeout),
                                         OPTIONS.prometheus_namespace_label, OPTIONS.prometheus_pod_label)
    return progress.ScrapeSource(session, OPTIONS.metrics_timeout)


@kopf.daemon(GROUP, VERSION, PLURAL, id="planner", cancellation_backoff=2.0, cancellation_timeout=5.0)
async def planner_daemon(stopped: kopf.DaemonStopped, body: kopf.Body, name: str, namespace: str,
                         **_: Any) -> None:
    """Every spec.planner.intervalSeconds: progress -> plan -> role moves -> status. Never raises."""
    async with aiohttp.ClientSession() as session:
        loop = Planner(body, name, namespace, make_source(session))
        last_error = ""
        while not stopped:
            try:
                await loop.tick()
                last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error:  # log each distinct failure once, not every tick
                    log.warning("%s/%s: planner tick failed: %s", namespace, name, error, exc_info=True)
                last_error = error
            await stopped.wait(resources.planner_interval(body.get("spec") or {}))
