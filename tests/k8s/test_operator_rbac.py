"""The operator's RBAC against the API calls it really makes.

The operator (kopf + the kubernetes client behind the handlers) runs against kmock through an RLJob's life
(create, a long tail that moves a pod to drafter and back, suspend, resume, an update that recreates the
controller Job, a controller failure, an invalid spec, delete) in every mode the Helm chart can start it in,
while every request it sends is recorded (tests/k8s/recording.py). Each request is authorized the way the
API server does (``(apiGroup, resource[/subresource], verb)``) and must be granted by
``tlt_operator.rbac.OPERATOR_RBAC_RULES`` as the chart binds them in that mode; the other way round, every
granted verb must be used by some request or be on :data:`JUSTIFIED` with the reason.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

pytest.register_assert_rewrite("tests.k8s.operator_fixtures", "tests.k8s.recording")

from tests.k8s.operator_fixtures import (  # noqa: E402
    NAMESPACE,
    RLJOBS,
    controller_page,
    create_pod,
    eventually,
    rljob_manifest,
    rollout_page,
)
from tests.k8s.recording import (  # noqa: E402
    OPERATOR_USER_AGENTS,
    Access,
    OperatorMode,
    Recorded,
    Session,
    authorize,
    denied,
    operator_session,
    triples,
)
from tlt_operator import rbac, resources  # noqa: E402
from tlt_operator.resources import LABEL_ROLE  # noqa: E402

#: Granted but never called against the emulator, and why each is still needed.
JUSTIFIED: dict[tuple[str, str, str], str] = {
    ("tlt.dev", "rljobs/finalizers", "update"):
        "the children's ownerReferences set blockOwnerDeletion: true, which a real API server with the "
        "OwnerReferencesPermissionEnforcement admission plugin only accepts from a client that may update the "
        "owner's finalizers subresource (kmock has no admission plugins)",
}

#: The chart's ways to run the operator: the default (--all-namespaces --standalone, scanning on) gets the
#: whole lifecycle; the others (namespaced, peering, TLT_OPERATOR_DISABLE_SCANNING) a create/tail/delete.
MODES = (
    (OperatorMode("all-namespaces", clusterwide=True), True),
    (OperatorMode("namespaced", clusterwide=False), False),
    (OperatorMode("all-namespaces+peering", clusterwide=True, peering="tlt"), False),
    (OperatorMode("namespaced+peering", clusterwide=False, peering="tlt"), False),
    (OperatorMode("namespaced, scanning off", clusterwide=False, scanning=False), False),
)


# ---- the scenario -------------------------------------------------------------------------------------------


async def _children(s: Session, name: str) -> dict[tuple[str, str], dict | None]:
    return {(kind, child): await s.api.child(kind, child) for _, kind, child in resources.child_refs(name)}


async def _wait_children(s: Session, name: str) -> dict[tuple[str, str], dict]:
    async def all_there():
        found = await _children(s, name)
        return found if all(found.values()) else None
    return await eventually(all_there, what=f"the children of {name}")


async def _wait_phase(s: Session, name: str, phase: str) -> dict:
    async def probe():
        obj = await s.api.rljob(name)
        return obj if obj and (obj.get("status") or {}).get("phase") == phase else None
    return await eventually(probe, what=f"{name} phase {phase}")


async def _pod_role(s: Session, pod: str) -> str | None:
    found = await s.api.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}")
    return found["metadata"]["labels"].get(LABEL_ROLE)


async def _long_tail(s: Session, name: str, children: dict) -> None:
    """Pod 0 goes idle in the tail -> drafter; prompts pending again -> back to rollout."""
    sts, job = children["StatefulSet", f"{name}-rollout"], children["Job", f"{name}-controller"]
    pod0, pod1, controller = f"{name}-rollout-0", f"{name}-rollout-1", f"{name}-controller-x"
    for pod, owner in ((pod0, sts), (pod1, sts), (controller, job)):
        await create_pod(s.api, owner, pod, await s.pages.serve(pod))
    s.pages.pages[controller] = controller_page("rollout", pending=0, step=1)
    s.pages.pages[pod0] = rollout_page(pod0, running=0, buffered=8, finished=8)
    s.pages.pages[pod1] = rollout_page(pod1, running=4)

    async def role_is(role):
        return await _pod_role(s, pod0) == role
    await eventually(lambda: role_is("drafter"), what=f"{pod0} moved to drafter")
    await eventually(lambda: s.api.events(name, "RoleChanged"), what="a RoleChanged event")
    s.pages.pages[controller] = controller_page("rollout", pending=16, step=2)
    s.pages.pages[pod0] = rollout_page(pod0, running=0, role="drafter")
    await eventually(lambda: role_is("rollout"), what=f"{pod0} moved back to rollout")

    async def told_back():  # the label moves first, then the RPC
        return s.roles.calls[:2] == [("127.0.0.1:50051", "drafter"), ("127.0.0.1:50051", "rollout")]
    await eventually(told_back, what="SetRole(drafter), then SetRole(rollout)")


async def _delete(s: Session, *names: str) -> None:
    for name in names:
        assert await s.api.delete(f"{RLJOBS}/{name}") == 200

    async def all_gone():
        for name in names:
            if await s.api.rljob(name) is not None or any((await _children(s, name)).values()):
                return False
        return True
    await eventually(all_gone, what=f"{', '.join(names)} and their children deleted")


async def _lifecycle(s: Session, full: bool) -> None:
    name = "rb"
    await s.api.create(RLJOBS, rljob_manifest(name, job={"name": name, "rollout": {"workers": 2},
                                                          "drafter": {"min_responses": 4}}))
    children = await _wait_children(s, name)
    await _wait_phase(s, name, "Running")
    await _long_tail(s, name, children)
    if not full:
        await _delete(s, name)
        return

    # Suspend and resume.
    await s.api.patch(f"{RLJOBS}/{name}", {"spec": {"suspend": True}})
    await _wait_phase(s, name, "Suspended")
    await s.api.patch(f"{RLJOBS}/{name}", {"spec": {"suspend": False}})
    await _wait_phase(s, name, "Running")

    # An update that changes the controller's pod template: the Job is deleted and created again.
    await s.api.patch(f"{RLJOBS}/{name}", {"spec": {"image": "ghcr.io/tlt-dev/tlt:0.2.0",
                                                    "job": {"rollout": {"workers": 3}}}})

    async def rolled():
        job = await s.api.child("Job", f"{name}-controller")
        return job is not None and job["spec"]["template"]["spec"]["containers"][0]["command"].count("--rollout") == 3
    await eventually(rolled, what="the controller Job recreated for 3 workers")

    # The controller fails for good.
    await s.api.patch(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}-controller",
                      {"status": {"failed": 4, "conditions": [{"type": "Failed", "status": "True",
                                                               "reason": "BackoffLimitExceeded"}]}})
    await _wait_phase(s, name, "Failed")

    # An invalid spec: status and a Warning, no children.
    await s.api.create(RLJOBS, rljob_manifest("rb-bad", job={"rollout": {"workers": 0}}))
    await _wait_phase(s, "rb-bad", "Failed")
    await eventually(lambda: s.api.events("rb-bad", "InvalidSpec"), what="an InvalidSpec event")

    await _delete(s, name, "rb-bad")


async def _record_all() -> dict[str, tuple[OperatorMode, list[Recorded]]]:
    recorded = {}
    for mode, full in MODES:
        async with operator_session(mode) as session:
            await _lifecycle(session, full)
        recorded[mode.name] = (mode, session.requests())
    return recorded


@pytest.fixture(scope="module")
def recorded() -> dict[str, tuple[OperatorMode, list[Recorded]]]:
    """mode name -> (mode, every request the operator sent in it); all modes run once, in a loop of their own."""
    return asyncio.run(_record_all())


def _used(recorded) -> set[tuple[str, str, str]]:
    return set().union(*(triples(r.access for r in requests) for _, requests in recorded.values()))


# ---- the checks -----------------------------------------------------------------------------------------------


def test_authorize_maps_requests_like_the_api_server():
    assert authorize("GET", "/apis/tlt.dev/v1alpha1/namespaces/ns/rljobs/a") == \
        Access("tlt.dev", "rljobs", "get", "ns", "a", "/apis/tlt.dev/v1alpha1/namespaces/ns/rljobs/a")
    assert authorize("GET", "/apis/tlt.dev/v1alpha1/rljobs").triple == ("tlt.dev", "rljobs", "list")
    assert authorize("GET", "/apis/tlt.dev/v1alpha1/rljobs", {"watch": "true"}).triple == \
        ("tlt.dev", "rljobs", "watch")
    assert authorize("GET", "/api/v1/watch/namespaces/ns/pods").triple == ("", "pods", "watch")
    assert authorize("PATCH", "/apis/tlt.dev/v1alpha1/namespaces/ns/rljobs/a/status").triple == \
        ("tlt.dev", "rljobs/status", "patch")
    assert authorize("POST", "/api/v1/namespaces/ns/events").triple == ("", "events", "create")
    assert authorize("PUT", "/apis/apps/v1/namespaces/ns/deployments/d").triple == ("apps", "deployments", "update")
    assert authorize("DELETE", "/apis/batch/v1/namespaces/ns/jobs/j").triple == ("batch", "jobs", "delete")
    assert authorize("DELETE", "/apis/batch/v1/namespaces/ns/jobs").triple == ("batch", "jobs", "deletecollection")
    namespaces = authorize("GET", "/api/v1/namespaces")
    assert (namespaces.triple, namespaces.namespace) == (("", "namespaces", "list"), None)
    assert authorize("GET", "/api/v1/namespaces/ns").triple == ("", "namespaces", "get")
    assert authorize("PUT", "/api/v1/namespaces/ns/finalize").triple == ("", "namespaces/finalize", "update")
    cluster_peering = authorize("PATCH", "/apis/kopf.dev/v1/clusterkopfpeerings/tlt")
    assert (cluster_peering.triple, cluster_peering.namespace) == (("kopf.dev", "clusterkopfpeerings", "patch"), None)
    for path in ("/api", "/api/v1", "/apis", "/apis/tlt.dev/v1alpha1", "/version"):
        assert authorize("GET", path).non_resource, path
    # What the chart binds where.
    wide, narrow = OperatorMode("w", clusterwide=True), OperatorMode("n", clusterwide=False)
    pods = authorize("GET", "/api/v1/pods")
    assert denied(pods, wide) is None and "all-namespaces" in denied(pods, narrow)
    assert "not watched" in denied(authorize("GET", "/api/v1/namespaces/other/pods"), narrow)
    assert denied(authorize("GET", "/api/v1/namespaces/default/secrets/s"), wide) == "not in OPERATOR_RBAC_RULES"
    assert denied(authorize("GET", "/apis/tlt.dev/v1alpha1"), narrow) is None
    assert denied(authorize("POST", "/apis/tlt.dev/v1alpha1"), narrow) is not None


def test_only_the_operator_is_recorded(recorded):
    for mode, requests in recorded.values():
        assert requests, mode
        strangers = [str(r) for r in requests if not r.user_agent.startswith(OPERATOR_USER_AGENTS)]
        assert not strangers, f"{mode.name}: requests from an unknown client: {strangers}"


def test_every_request_is_allowed_by_the_rbac(recorded):
    refused = collections.defaultdict(set)
    for mode, requests in recorded.values():
        for request in requests:
            why = denied(request.access, mode)
            if why is not None:
                refused[mode.name].add(f"{request} -> {request.access.triple}: {why}")
    assert not refused, "the chart's RBAC would refuse:\n" + "\n".join(
        f"  [{mode}] {line}" for mode, lines in refused.items() for line in sorted(lines))


def test_every_granted_permission_is_used_or_justified(recorded):
    granted = {(r.api_group, r.resource, verb) for r in rbac.rules(peering=True) for verb in r.verbs}
    used = _used(recorded)
    unused = granted - used - set(JUSTIFIED)
    assert not unused, f"granted but never used (remove from OPERATOR_RBAC_RULES or justify): {sorted(unused)}"
    assert set(JUSTIFIED) <= granted, f"justified but not granted: {sorted(set(JUSTIFIED) - granted)}"
    assert not set(JUSTIFIED) & used, f"used, no justification needed: {sorted(set(JUSTIFIED) & used)}"


def test_each_mode_uses_its_own_kopf_machinery(recorded):
    """The modes really differ the way the chart's bindings assume (a guard against a mode silently running as
    another one, which would leave its rules untested)."""
    by_mode = {name: triples(r.access for r in requests) for name, (_, requests) in recorded.items()}
    crds = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    namespaces = {("", "namespaces", v) for v in ("list", "watch")}
    cluster_peering = {("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")}
    peering = {("kopf.dev", "kopfpeerings", v) for v in ("list", "watch", "patch")}
    assert crds <= by_mode["all-namespaces"] and not namespaces & by_mode["all-namespaces"]
    assert crds | namespaces <= by_mode["namespaced"]
    assert cluster_peering <= by_mode["all-namespaces+peering"]
    assert peering <= by_mode["namespaced+peering"]
    assert not (crds | namespaces) & by_mode["namespaced, scanning off"]
    for name, used in by_mode.items():
        assert {("", "pods", "list"), ("", "pods", "patch"), ("tlt.dev", "rljobs", "watch"),
                ("tlt.dev", "rljobs/status", "patch"), ("", "events", "create"), ("batch", "jobs", "delete")} <= used, \
            name
        if "peering" not in name:
            assert not (peering | cluster_peering) & used, name
