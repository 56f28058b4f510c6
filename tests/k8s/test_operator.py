"""The RLJob operator end to end against kmock (an in-memory Kubernetes API on a real HTTP port), with kopf
running in the test's event loop and fake /metrics pages served over real HTTP.

Settings that kmock needs are in tests/k8s/operator_fixtures.py. Role moves go through a recording
RoleSetter; the real SetRole gRPC path (tlt.rpc.client.set_worker_role) is tested with the services.
"""

from __future__ import annotations

import copy

import pytest
import yaml

# Register before importing, so the fixtures module's asserts are rewritten and pytest_plugins does not warn.
pytest.register_assert_rewrite("tests.k8s.operator_fixtures")

from tests.k8s.operator_fixtures import (  # noqa: E402
    NAMESPACE,
    RLJOBS,
    controller_page,
    create_pod,
    eventually,
    rljob_manifest,
    rollout_page,
)
from tlt_operator import handlers, resources  # noqa: E402
from tlt_operator.resources import LABEL_ROLE  # noqa: E402

pytest_plugins = ["tests.k8s.operator_fixtures"]

CHILDREN = resources.child_refs  # (apiVersion, kind, name) per child


def _condition(obj, type_):
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


async def _children(kube_api, name):
    return {(kind, child): await kube_api.child(kind, child) for _, kind, child in CHILDREN(name)}


async def _called(role_recorder, call):
    return call in role_recorder.calls


async def _wait_children(kube_api, name):
    async def all_there():
        found = await _children(kube_api, name)
        return found if all(found.values()) else None
    return await eventually(all_there, what=f"the children of {name}")


async def _wait_status(kube_api, name, check, what):
    async def probe():
        obj = await kube_api.rljob(name)
        if obj is not None:
            obj.setdefault("status", {})  # not written yet on a slow machine
        return obj if obj and check(obj) else None
    return await eventually(probe, what=what)


# ---- pure rendering (no API) ----------------------------------------------------------------------------


def test_build_children_renders_the_contract():
    rljob = rljob_manifest("r", storage={"s3": {"endpoint": "http://s3:9000", "region": "eu-west-1",
                                                "credentialsSecret": "s3-creds"},
                                         "volume": {"claimName": "tlt-data"}},
                           pods={"rollout": {"resources": {"limits": {"cpu": "2"}}, "nodeSelector": {"gpu": "yes"},
                                             "tolerations": [{"key": "gpu", "operator": "Exists"}],
                                             "env": [{"name": "EXTRA", "value": "1"}]}})
    children = {(c["kind"], c["metadata"]["name"]): c for c in resources.build_children(rljob)}
    assert list(children) == [(kind, name) for _, kind, name in resources.child_refs("r")]
    for child in children.values():
        assert child["metadata"]["ownerReferences"] == [{
            "apiVersion": "tlt.dev/v1alpha1", "kind": "RLJob", "name": "r", "uid": rljob["metadata"]["uid"],
            "controller": True, "blockOwnerDeletion": True}]
        assert child["metadata"]["labels"]["tlt.dev/job"] == "r"
        assert child["metadata"]["labels"]["app.kubernetes.io/name"] == "tlt"
    job_yaml = yaml.safe_load(children["ConfigMap", "r-spec"]["data"]["job.yaml"])
    assert job_yaml["store"]["uri"] == "/var/lib/tlt/store"  # defaulted onto the volume
    sts = children["StatefulSet", "r-rollout"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["EXTRA"]["value"] == "1"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert container["resources"] == {"limits": {"cpu": "2"}}
    assert {"name": "data", "mountPath": "/var/lib/tlt"} in container["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "tlt-data"}} in pod["volumes"]
    assert pod["nodeSelector"] == {"gpu": "yes"} and pod["tolerations"][0]["key"] == "gpu"
    assert "role" not in str(sts["spec"]["selector"])  # the operator moves the role label; never select on it
    # suspend: replicas 0, Job suspended
    suspended = copy.deepcopy(rljob)
    suspended["spec"]["suspend"] = True
    out = {(c["kind"], c["metadata"]["name"]): c for c in resources.build_children(suspended)}
    assert out["StatefulSet", "r-rollout"]["spec"]["replicas"] == 0
    assert out["Deployment", "r-drafter"]["spec"]["replicas"] == 0
    assert out["Job", "r-controller"]["spec"]["suspend"] is True


def test_validate_spec_names_the_field():
    from tlt.errors import ConfigError

    spec = rljob_manifest("v", job={"rollout": {"workers": 0}})["spec"]
    with pytest.raises(ConfigError, match=r"^spec\.job\.rollout\.workers must be >= 1"):
        resources.validate_spec(spec)
    spec["job"] = {"rollout": {"wokers": 2}}
    with pytest.raises(ConfigError, match=r"spec\.job\.rollout\.wokers: unknown field; did you mean 'workers'"):
        resources.validate_spec(spec)
    spec["job"], spec["planner"] = {}, {"intervalSeconds": 0}
    with pytest.raises(ConfigError, match=r"spec\.planner\.intervalSeconds"):
        resources.validate_spec(spec)


_FAILED = {"type": "Failed", "status": "True", "reason": "ControllerFailed"}
_INVALID = {"type": "Failed", "status": "True", "reason": "InvalidSpec"}


@pytest.mark.parametrize("old, patch, expected", [
    ({"phase": "Running"}, {"phase": "Failed", "conditions": [_FAILED]}, ["ControllerFailed"]),
    ({"phase": "Running"}, {"phase": "Complete"}, ["Complete"]),
    # an invalid spec had made it Failed; fixed, the Job is found failed: the phase stays, the news is new
    ({"phase": "Failed", "conditions": [_INVALID]}, {"conditions": [_FAILED]}, ["ControllerFailed"]),
    ({"phase": "Failed", "conditions": [_FAILED]}, {"observedGeneration": 2}, []),  # already announced
    ({"phase": "Complete"}, {"observedGeneration": 2}, []),
    ({"phase": "Running"}, {}, []),
    ({"phase": "Running"}, {"phase": "Suspended"}, []),
])
def test_announce_outcome_posts_once_per_outcome(monkeypatch, old, patch, expected):
    posted = []
    monkeypatch.setattr(handlers.kopf, "event", lambda body, type, reason, message: posted.append(reason))
    handlers.announce_outcome({}, old, patch, "why")
    assert posted == expected


# ---- against the emulator ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_builds_owned_children(running_operator, kube_api):
    manifest = rljob_manifest("alpha")
    await kube_api.create(RLJOBS, manifest)
    children = await _wait_children(kube_api, "alpha")
    uid = manifest["metadata"]["uid"]
    for (kind, name), child in children.items():
        refs = child["metadata"]["ownerReferences"]
        assert refs == [{"apiVersion": "tlt.dev/v1alpha1", "kind": "RLJob", "name": "alpha", "uid": uid,
                         "controller": True, "blockOwnerDeletion": True}], (kind, name)
        assert child["metadata"]["labels"]["app.kubernetes.io/instance"] == "alpha"

    sts = children["StatefulSet", "alpha-rollout"]
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == "alpha-rollout"
    template = sts["spec"]["template"]
    assert template["metadata"]["labels"][LABEL_ROLE] == "rollout"
    (rollout,) = template["spec"]["containers"]
    assert rollout["command"] == ["tlt", "serve", "rollout", "--config", "/etc/tlt/job.yaml", "--host", "0.0.0.0",
                                  "--port", "50051", "--metrics-port", "8080", "--name", "$(POD_NAME)",
                                  "--drafter", "alpha-drafter:50051"]
    assert {p["name"]: p["containerPort"] for p in rollout["ports"]} == {"grpc": 50051, "metrics": 8080}
    assert rollout["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert rollout["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    assert {"name": "config", "mountPath": "/etc/tlt", "readOnly": True} in rollout["volumeMounts"]
    assert children["Service", "alpha-rollout"]["spec"]["clusterIP"] == "None"

    for role in ("drafter", "trainer"):
        deployment = children["Deployment", f"alpha-{role}"]
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["tlt", "serve", role]
        assert children["Service", f"alpha-{role}"]["spec"]["ports"][0]["port"] == 50051

    job = children["Job", "alpha-controller"]
    assert job["spec"]["backoffLimit"] == 3 and job["spec"]["suspend"] is False
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["tlt", "run", "/etc/tlt/job.yaml", "--no-progress"]
    assert [command[i + 1] for i, a in enumerate(command) if a == "--rollout"] == [
        "alpha-rollout-0.alpha-rollout:50051", "alpha-rollout-1.alpha-rollout:50051"]
    assert command[-8:] == ["--trainer", "alpha-trainer:50051", "--planner", "external", "--metrics-port", "8080",
                            "--metrics-host", "0.0.0.0"]
    assert yaml.safe_load(children["ConfigMap", "alpha-spec"]["data"]["job.yaml"]) == manifest["spec"]["job"]

    obj = await _wait_status(kube_api, "alpha", lambda o: _condition(o, "Ready").get("status") == "True", "Ready")
    assert obj["status"]["phase"] == "Running"
    assert obj["status"]["observedGeneration"] == 1
    assert "tlt.dev/finalizer" in obj["metadata"]["finalizers"]
    await eventually(lambda: kube_api.events("alpha", "Created"), what="a Created event")


@pytest.mark.asyncio
async def test_long_tail_moves_idle_pods_to_drafter_and_back(running_operator, kube_api, metrics_pages, role_recorder):
    await kube_api.create(RLJOBS, rljob_manifest("tail", job={"name": "tail", "rollout": {"workers": 3},
                                                         "drafter": {"min_responses": 4}}))
    children = await _wait_children(kube_api, "tail")
    sts, job = children["StatefulSet", "tail-rollout"], children["Job", "tail-controller"]
    pods = [f"tail-rollout-{i}" for i in range(3)]
    for pod in pods:
        await create_pod(kube_api, sts, pod, await metrics_pages.serve(pod))
    await create_pod(kube_api, job, "tail-controller-abcde", await metrics_pages.serve("tail-controller-abcde"))

    # The tail: nothing pending; pod 0 idle with finished responses, pod 1 still decoding,
    # pod 2 unreachable (no page: 503), so it is unknown and must keep its role.
    metrics_pages.pages["tail-controller-abcde"] = controller_page("rollout", pending=0, step=3, acceptance=2.5,
                                                                  policy_version=3, drafter_version=7)
    metrics_pages.pages["tail-rollout-0"] = rollout_page("tail-rollout-0", running=0, buffered=12, finished=12)
    metrics_pages.pages["tail-rollout-1"] = rollout_page("tail-rollout-1", running=5, buffered=3, finished=3)

    async def pod_role(pod):
        found = await kube_api.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}")
        return found["metadata"]["labels"].get(LABEL_ROLE)

    async def is_drafter():
        return await pod_role("tail-rollout-0") == "drafter"
    await eventually(is_drafter, what="tail-rollout-0 labelled drafter")
    await eventually(lambda: _called(role_recorder, ("127.0.0.1:50051", "drafter")), what="SetRole(drafter)")
    events = await eventually(lambda: kube_api.events("tail", "RoleChanged"), what="a RoleChanged event")
    assert events[0]["message"] == "tail-rollout-0: rollout -> drafter (long tail)"
    assert events[0]["type"] == "Normal"
    obj = await _wait_status(kube_api, "tail", lambda o: (o.get("status") or {}).get("drafterPods") == 1,
                             "drafterPods 1")
    status = obj["status"]
    assert status["roles"] == {"tail-rollout-0": "drafter", "tail-rollout-1": "rollout", "tail-rollout-2": "rollout"}
    assert (status["step"], status["policyVersion"], status["drafterVersion"]) == (3, 3, 7)
    assert status["acceptanceLength"] == 2.5
    assert _condition(obj, "LongTail")["status"] == "True"
    assert _condition(obj, "DrafterTraining")["status"] == "True"
    assert await pod_role("tail-rollout-1") == "rollout" and await pod_role("tail-rollout-2") == "rollout"
    assert all(role == "drafter" for _, role in role_recorder.calls)  # nobody else was moved

    # The next rollout starts: prompts are pending again -> back to rollout.
    metrics_pages.pages["tail-controller-abcde"] = controller_page("rollout", pending=16, step=4)
    metrics_pages.pages["tail-rollout-0"] = rollout_page("tail-rollout-0", running=0, role="drafter")

    async def is_rollout():
        return await pod_role("tail-rollout-0") == "rollout"
    await eventually(is_rollout, what="tail-rollout-0 labelled rollout again")
    await eventually(lambda: _called(role_recorder, ("127.0.0.1:50051", "rollout")), what="SetRole(rollout)")
    async def moved_back_event():
        return [e for e in await kube_api.events("tail", "RoleChanged")
                if e["message"] == "tail-rollout-0: drafter -> rollout (new rollout)"]
    await eventually(moved_back_event, what="the move-back event")
    obj = await _wait_status(kube_api, "tail", lambda o: o["status"].get("drafterPods") == 0 and
                             _condition(o, "LongTail").get("status") == "False", "drafterPods 0, no tail")
    assert obj["status"]["roles"]["tail-rollout-0"] == "rollout"
    assert obj["status"]["step"] == 4
    assert _condition(obj, "DrafterTraining")["status"] == "False"

    # The controller Job succeeds -> Complete.
    await kube_api.patch(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/tail-controller",
                    {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    obj = await _wait_status(kube_api, "tail", lambda o: o["status"].get("phase") == "Complete", "phase Complete")
    assert _condition(obj, "Complete")["status"] == "True"


@pytest.mark.asyncio
async def test_failed_set_role_reverts_the_label_and_is_retried(running_operator, kube_api, metrics_pages,
                                                                role_recorder):
    await kube_api.create(RLJOBS, rljob_manifest("flaky"))
    children = await _wait_children(kube_api, "flaky")
    sts, job = children["StatefulSet", "flaky-rollout"], children["Job", "flaky-controller"]
    for i, pod in enumerate(("flaky-rollout-0", "flaky-rollout-1")):
        await create_pod(kube_api, sts, pod, await metrics_pages.serve(pod), grpc_port=51000 + i)
    await create_pod(kube_api, job, "flaky-controller-x", await metrics_pages.serve("flaky-controller-x"))
    role_recorder.failing.add("127.0.0.1:51000")
    metrics_pages.pages["flaky-controller-x"] = controller_page("rollout", pending=0)
    metrics_pages.pages["flaky-rollout-0"] = rollout_page("flaky-rollout-0", running=0, buffered=8)
    metrics_pages.pages["flaky-rollout-1"] = rollout_page("flaky-rollout-1", running=2)

    warnings = await eventually(lambda: kube_api.events("flaky", "RoleChangeFailed"), what="a RoleChangeFailed event")
    assert warnings[0]["type"] == "Warning" and "flaky-rollout-0: rollout -> drafter failed" in warnings[0]["message"]
    # The label was put back (the worker was not told), so the status still says rollout.
    obj = await _wait_status(kube_api, "flaky", lambda o: "flaky-rollout-0" in (o["status"].get("roles") or {}),
                             "roles")
    assert obj["status"]["roles"]["flaky-rollout-0"] == "rollout" and obj["status"]["drafterPods"] == 0
    assert not await kube_api.events("flaky", "RoleChanged")

    role_recorder.failing.clear()  # the worker is reachable again: the next tick moves it

    async def moved():
        pod = await kube_api.get(f"/api/v1/namespaces/{NAMESPACE}/pods/flaky-rollout-0")
        return pod["metadata"]["labels"][LABEL_ROLE] == "drafter"
    await eventually(moved, what="flaky-rollout-0 moved after the retry")
    await eventually(lambda: kube_api.events("flaky", "RoleChanged"), what="a RoleChanged event after the retry")
    assert len(await kube_api.events("flaky", "RoleChangeFailed")) == 1  # throttled: one Warning per pod and minute


@pytest.mark.asyncio
async def test_suspend_resume_and_update(running_operator, kube_api):
    await kube_api.create(RLJOBS, rljob_manifest("sus"))
    await _wait_children(kube_api, "sus")

    async def replicas():
        sts = await kube_api.child("StatefulSet", "sus-rollout")
        drafter = await kube_api.child("Deployment", "sus-drafter")
        trainer = await kube_api.child("Deployment", "sus-trainer")
        job = await kube_api.child("Job", "sus-controller")
        return (sts["spec"]["replicas"], drafter["spec"]["replicas"], trainer["spec"]["replicas"],
                job["spec"]["suspend"])

    await kube_api.patch(f"{RLJOBS}/sus", {"spec": {"suspend": True}})
    await eventually(lambda: _eq(replicas(), (0, 0, 0, True)), what="scaled to 0")
    obj = await _wait_status(kube_api, "sus", lambda o: o["status"].get("phase") == "Suspended", "phase Suspended")
    assert _condition(obj, "Suspended")["status"] == "True"
    assert obj["status"]["observedGeneration"] == 2
    await eventually(lambda: kube_api.events("sus", "Suspended"), what="a Suspended event")

    await kube_api.patch(f"{RLJOBS}/sus", {"spec": {"suspend": False}})
    await eventually(lambda: _eq(replicas(), (2, 1, 1, False)), what="scaled back")
    obj = await _wait_status(kube_api, "sus", lambda o: o["status"].get("phase") == "Running", "phase Running")
    assert _condition(obj, "Suspended")["status"] == "False"
    await eventually(lambda: kube_api.events("sus", "Resumed"), what="a Resumed event")

    # Scale the rollout and roll the image: StatefulSet replicas, every image, the controller's --rollout list.
    await kube_api.patch(f"{RLJOBS}/sus", {"spec": {"image": "ghcr.io/tlt-dev/tlt:0.2.0",
                                               "job": {"name": "sus", "rollout": {"workers": 3}}}})

    async def rolled():
        job = await kube_api.child("Job", "sus-controller")
        sts = await kube_api.child("StatefulSet", "sus-rollout")
        if job is None or sts["spec"]["replicas"] != 3 or \
                job["spec"]["template"]["spec"]["containers"][0]["command"].count("--rollout") != 3:
            return None
        return job, sts
    job, sts = await eventually(rolled, what="3 workers and a new controller Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/tlt-dev/tlt:0.2.0"
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/tlt-dev/tlt:0.2.0"
    drafter = await kube_api.child("Deployment", "sus-drafter")
    assert drafter["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/tlt-dev/tlt:0.2.0"
    config = await kube_api.child("ConfigMap", "sus-spec")
    assert yaml.safe_load(config["data"]["job.yaml"])["rollout"]["workers"] == 3


async def _eq(awaitable, expected):
    return await awaitable == expected


@pytest.mark.asyncio
async def test_controller_failure_then_delete_cleans_up(running_operator, kube_api):
    await kube_api.create(RLJOBS, rljob_manifest("gone"))
    await _wait_children(kube_api, "gone")
    await _wait_status(kube_api, "gone", lambda o: "tlt.dev/finalizer" in (o["metadata"].get("finalizers") or []),
                       "the finalizer")
    # The controller Job fails for good -> phase Failed, a Warning Event.
    await kube_api.patch(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/gone-controller",
                         {"status": {"failed": 4, "conditions": [{"type": "Failed", "status": "True",
                                                                  "reason": "BackoffLimitExceeded",
                                                                  "message": "Job has reached the backoff limit"}]}})
    obj = await _wait_status(kube_api, "gone", lambda o: o["status"].get("phase") == "Failed", "phase Failed")
    assert _condition(obj, "Failed")["reason"] == "ControllerFailed"
    events = await eventually(lambda: kube_api.events("gone", "ControllerFailed"), what="a ControllerFailed event")
    assert events[0]["type"] == "Warning" and "backoff limit" in events[0]["message"]

    assert await kube_api.delete(f"{RLJOBS}/gone") == 200

    async def all_gone():
        found = await _children(kube_api, "gone")
        return not any(found.values()) and await kube_api.rljob("gone") is None
    await eventually(all_gone, what="children and the RLJob deleted")


@pytest.mark.asyncio
async def test_a_job_found_failed_at_reconcile_is_announced(running_operator, kube_api):
    """The controller Job failed before the handlers reconciled (it failed while the operator was down): the
    handlers write phase Failed (the planner writes only once they have observed the generation), so they
    must post the Event; the planner then finds nothing new to write."""
    manifest = rljob_manifest("late")
    (job,) = [c for c in resources.build_children(manifest) if c["kind"] == "Job"]
    job = await kube_api.create(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", job)
    await kube_api.patch(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/late-controller",
                         {"status": {"failed": 4, "conditions": [{"type": "Failed", "status": "True",
                                                                  "reason": "BackoffLimitExceeded",
                                                                  "message": "Job has reached the backoff limit"}]}})
    await kube_api.create(RLJOBS, manifest)
    obj = await _wait_status(kube_api, "late", lambda o: o["status"].get("phase") == "Failed", "phase Failed")
    assert _condition(obj, "Failed")["reason"] == "ControllerFailed"
    events = await eventually(lambda: kube_api.events("late", "ControllerFailed"), what="a ControllerFailed event")
    assert len(events) == 1 and "backoff limit" in events[0]["message"]


@pytest.mark.asyncio
async def test_invalid_spec_is_reported_and_the_operator_keeps_going(running_operator, kube_api):
    await kube_api.create(RLJOBS, rljob_manifest("bad0", job={"rollout": {"workers": 0}}))
    await kube_api.create(RLJOBS, rljob_manifest("bad1", job={"rollout": {"wokers": 2}}))

    for name, field, hint in (("bad0", "spec.job.rollout.workers", "must be >= 1"),
                              ("bad1", "spec.job.rollout.wokers", "did you mean 'workers'")):
        obj = await _wait_status(kube_api, name, lambda o: (o.get("status") or {}).get("phase") == "Failed",
                                 f"{name} Failed")
        failed = _condition(obj, "Failed")
        assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec")
        assert field in failed["message"] and hint in failed["message"]
        assert _condition(obj, "Ready")["status"] == "False"
        events = await eventually(lambda n=name: kube_api.events(n, "InvalidSpec"), what=f"{name} InvalidSpec event")
        assert events[0]["type"] == "Warning" and field in events[0]["message"]
        assert await kube_api.child("StatefulSet", f"{name}-rollout") is None

    # The operator is still alive and serves a valid RLJob.
    await kube_api.create(RLJOBS, rljob_manifest("good"))
    await _wait_children(kube_api, "good")
    await _wait_status(kube_api, "good", lambda o: (o.get("status") or {}).get("phase") == "Running", "good Running")

    # Fixing the spec of a failed RLJob reconciles it.
    await kube_api.patch(f"{RLJOBS}/bad0", {"spec": {"job": {"rollout": {"workers": 1}}}})
    await _wait_children(kube_api, "bad0")
    obj = await _wait_status(kube_api, "bad0", lambda o: o["status"].get("phase") == "Running", "bad0 Running")
    assert _condition(obj, "Failed")["status"] == "False"


def test_chart_s3_defaults_fill_what_an_s3_rljob_leaves_unset():
    env = {"TLT_DEFAULT_S3_ENDPOINT": "http://minio.minio.svc:9000", "TLT_DEFAULT_S3_REGION": "us-east-1",
           "TLT_DEFAULT_S3_CREDENTIALS_SECRET": "tlt-s3"}

    def rollout_container(rljob):
        children = {(c["kind"], c["metadata"]["name"]): c for c in resources.build_children(rljob, None, env)}
        (container,) = children["StatefulSet", "r-rollout"]["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in container["env"]}, container.get("envFrom")

    on_s3 = {"name": "r", "store": {"uri": "s3://bucket/jobs/r"}}
    got, env_from = rollout_container(rljob_manifest("r", job=on_s3))
    assert got["AWS_ENDPOINT_URL"] == "http://minio.minio.svc:9000" and got["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env_from == [{"secretRef": {"name": "tlt-s3"}}]
    # the RLJob's own settings win, field by field
    got, env_from = rollout_container(rljob_manifest("r", job=on_s3, storage={"s3": {"endpoint": "http://own:9000"}}))
    assert got["AWS_ENDPOINT_URL"] == "http://own:9000" and got["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env_from == [{"secretRef": {"name": "tlt-s3"}}]
    # a job whose store is not on S3 gets no S3 settings
    got, env_from = rollout_container(rljob_manifest("r", job={"name": "r"}))
    assert "AWS_ENDPOINT_URL" not in got and env_from is None
