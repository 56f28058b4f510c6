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

This module holds the kopf wiring and the process-wide state (options, the logged-in API client);
:mod:`tlt_operator.kube_api` the API access, :mod:`tlt_operator.status` the status and conditions, and
:mod:`tlt_operator.planner_loop` one job's planner loop.

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
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from tlt.errors import ConfigError
from tlt_operator import progress, resources
from tlt_operator.kube_api import FIELD_MANAGER, Kube, api_client_for, object_path
from tlt_operator.planner_loop import Planner
from tlt_operator.resources import GROUP, PLURAL, VERSION
from tlt_operator.role_setter import GrpcRoleSetter, RoleSetter
from tlt_operator.status import Condition, announce_outcome, condition_status, controller_outcome, now_iso, status_patch

log = logging.getLogger("tlt_operator")

FINALIZER = "tlt.dev/finalizer"


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

_KUBE: Kube | None = None


def kube() -> Kube:
    if _KUBE is None:
        raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
    return _KUBE


# ---- status -----------------------------------------------------------------------------------------

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
        loop = Planner(body, name, namespace, make_source(session), kube=kube, write_status=update_status,
                       role_setter=OPTIONS.role_setter, rpc_timeout=OPTIONS.rpc_timeout)
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
