"""Fixtures for the operator tests: the kmock API emulator, the operator running in the same event loop,
fake /metrics pages on real HTTP ports, and a recording RoleSetter.

Register with ``pytest_plugins = ["tests.k8s.operator_fixtures"]``.

kmock settings (see notes/test-infrastructure.md): bundled builtin resources are loaded (kopf waits for
``v1/namespaces``), the RLJob resource is served with a status subresource, kopf's scanning is off, and RLJobs
are created with a ``metadata.resourceVersion`` (kopf's finalizer patches test it) and a ``uid`` (children's
ownerReferences need it). kmock has no kubelet, no controllers and no garbage collection: tests create the
rollout/controller Pods themselves (podIP 127.0.0.1, the metrics port in the ``tlt.dev/metrics-port``
annotation) and set Job statuses by hand.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import json
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp.web
import kmock
import kopf
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, generate_latest

from tlt import metrics as m
from tlt_operator import handlers, resources
from tlt_operator.role_setter import RoleSetError

NAMESPACE = "default"
RLJOBS = f"/apis/{resources.GROUP}/{resources.VERSION}/namespaces/{NAMESPACE}/{resources.PLURAL}"


class _Clock:
    """resourceVersions: one increasing counter for all objects, as etcd's revision."""

    def __init__(self) -> None:
        self.last = 999

    def tick(self) -> str:
        self.last += 1
        return str(self.last)


_CLOCK = _Clock()


def _merged(old: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


def _version(obj: Any) -> int:
    value = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    return int(value) if isinstance(value, str) and value.isdigit() else 0


class Emulator(kmock.KubernetesEmulator):
    """kmock plus the API-server behaviour that kopf relies on once several objects and writers are involved:

    * every write bumps ``resourceVersion`` (one counter); lists report the current one, and a watch from a
      version sends nothing at or below it, nor older states than it already sent. With kmock's constant
      versions and replayed snapshots kopf takes a stale state for its own patched one and re-runs finished
      handlers (or retries a finalizer patch forever).
    * ``generation`` is bumped when a merge patch changes ``spec``; ``uid`` / ``creationTimestamp`` on create.
    * names from ``generateName`` (kopf's Events; kmock would store them all under the name None).
    * a JSON patch whose ``test`` of ``/metadata/resourceVersion`` fails gets 422 (kopf retries), not 500.
    """

    def _current(self, request: kmock.Request) -> Any:
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
        except KeyError:
            return None
        return None if obj.deleted else obj

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        data = request.data
        if request.resource is None:
            return await super()._handle(request)
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta.setdefault("generation", 1)
            meta["resourceVersion"] = _CLOCK.tick()
        elif request.action == kmock.action.UPDATE and request.name:
            current = self._current(request)
            if isinstance(data, dict):
                meta = data.get("metadata")
                meta = data["metadata"] = dict(meta) if isinstance(meta, dict) else {}
                if "spec" in data and request.subresource is None and current is not None \
                        and _merged(copy.deepcopy(current.get("spec")), data["spec"]) != current.get("spec"):
                    meta["generation"] = int((current.get("metadata") or {}).get("generation") or 0) + 1
                meta["resourceVersion"] = _CLOCK.tick()
            elif isinstance(data, list):
                have = (current.get("metadata") or {}).get("resourceVersion") if current is not None else None
                for op in data:
                    if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" \
                            and op.get("value") != have:
                        raise kmock.KubernetesError(status=422, reason="Invalid",
                                                    message=f"resourceVersion {op.get('value')} != {have}")
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": _CLOCK.tick()})
        elif request.action == kmock.action.DELETE and request.name:
            # A soft delete (finalizers present) is a write too: do it here with a new version.
            current = self._current(request)
            meta = (current.get("metadata") or {}) if current is not None else {}
            if meta.get("finalizers") and not meta.get("deletionTimestamp"):
                async with self._lock:
                    now = datetime.datetime.now(datetime.UTC).isoformat()
                    current.patch({"metadata": {"deletionTimestamp": now, "resourceVersion": _CLOCK.tick()}})
                    await self._buses[request.resource].put({"type": "MODIFIED", "object": current.raw})
        return await super()._handle(request)

    async def _serve_list(self, request: kmock.Request) -> Any:
        reply = await super()._serve_list(request)
        reply["metadata"]["resourceVersion"] = str(_CLOCK.last)
        return reply

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        since = str(request.params.get("resourceVersion") or "")
        floor = int(since) if since.isdigit() else 0
        sent: dict[tuple[str, str], int] = {}
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and isinstance(event.get("object"), dict) and event.get("type") != "DELETED":
                meta = event["object"].get("metadata") or {}
                key = (meta.get("namespace"), meta.get("name"))
                version = _version(event["object"])
                if version <= max(floor, sent.get(key, 0)):
                    continue  # already listed or already sent: a real watch never goes back in time
                sent[key] = version
            yield event


class Api:
    """Tiny JSON client for the emulator (the test's side of the API)."""

    def __init__(self, emulator: Emulator) -> None:
        self.k = emulator

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        kwargs = {"json": body} if body is not None else {}
        if method == "PATCH":
            kwargs["headers"] = {"Content-Type": "application/merge-patch+json"}
        reply = await self.k.request(method, path, **kwargs)
        async with reply:
            text = await reply.text()
        return reply.status, (json.loads(text) if text else None)

    async def get(self, path: str) -> dict[str, Any] | None:
        status, data = await self._call("GET", path)
        if status == 404:
            return None
        assert status == 200, (path, status, data)
        return data

    async def list(self, path: str) -> list[dict[str, Any]]:
        return (await self.get(path) or {}).get("items") or []

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, data = await self._call("POST", path, body)
        assert status in (200, 201), (path, status, data)
        return data

    async def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, data = await self._call("PATCH", path, body)
        assert status == 200, (path, status, data)
        return data

    async def delete(self, path: str) -> int:
        status, _ = await self._call("DELETE", path)
        return status

    async def events(self, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        items = await self.list(f"/api/v1/namespaces/{NAMESPACE}/events")
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name
                and (reason is None or e.get("reason") == reason)]

    # RLJob helpers
    async def rljob(self, name: str) -> dict[str, Any] | None:
        return await self.get(f"{RLJOBS}/{name}")

    async def child(self, kind: str, name: str) -> dict[str, Any] | None:
        return await self.get(handlers.object_path(kind, NAMESPACE, name))


def rljob_manifest(name: str, job: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """An RLJob as a user would write it, with a known uid (to check the children's ownerReferences)."""
    return {
        "apiVersion": resources.API_VERSION, "kind": resources.KIND,
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": str(uuid.uuid4())},
        "spec": {"image": "ghcr.io/tlt-dev/tlt:0.1.0",
                 "job": job if job is not None else {"name": name, "rollout": {"workers": 2}},
                 "planner": {"intervalSeconds": 0.2}, **spec},
    }


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail with the last value after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")
        await asyncio.sleep(0.05)


# ---- the role setter ----------------------------------------------------------------------------------


class RecordingRoleSetter:
    """Records every SetRole call; addresses in ``failing`` raise RoleSetError."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.failing: set[str] = set()
        self._lock = threading.Lock()

    def set_role(self, address: str, role: str, timeout: float) -> None:
        with self._lock:
            self.calls.append((address, role))
        if address in self.failing:
            raise RoleSetError(f"SetRole({role}) on {address} failed: unavailable")


# ---- fake metrics pages ---------------------------------------------------------------------------------


def render(samples: list[m.Sample]) -> str:
    registry = CollectorRegistry()
    registry.register(m.CallbackCollector(lambda: samples))
    return generate_latest(registry).decode()


def rollout_page(worker: str, running: int, queued: int = 0, buffered: int = 0, finished: int = 0,
                 role: str = "rollout", policy_version: int = 0, drafter_version: int = 0) -> str:
    labels = {"worker": worker}
    return render([
        (m.ROLLOUT_REQUESTS_RUNNING, labels, running), (m.ROLLOUT_REQUESTS_QUEUED, labels, queued),
        (m.ROLLOUT_REQUESTS_FINISHED, labels, finished), (m.ROLLOUT_BUFFERED_RESPONSES, labels, buffered),
        *m.one_hot(m.ROLLOUT_ROLE, role, ("rollout", "drafter"), worker=worker),
        (m.ROLLOUT_POLICY_VERSION, labels, policy_version), (m.ROLLOUT_DRAFTER_VERSION, labels, drafter_version),
        (m.ROLLOUT_SPEC_DECODE_NUM_DRAFTS, labels, 10), (m.ROLLOUT_SPEC_DECODE_NUM_ACCEPTED_TOKENS, labels, 25),
    ])


def controller_page(phase: str, pending: int, step: int = 0, acceptance: float = 0.0, policy_version: int = 0,
                    drafter_version: int = 0) -> str:
    return render([
        (m.CONTROLLER_STEP, {}, step), *m.one_hot(m.CONTROLLER_PHASE, phase, ("rollout", "update", "done")),
        (m.CONTROLLER_PENDING_REQUESTS, {}, pending), (m.CONTROLLER_ACCEPTANCE_LENGTH, {}, acceptance),
        (m.CONTROLLER_POLICY_VERSION, {}, policy_version), (m.CONTROLLER_DRAFTER_VERSION, {}, drafter_version),
    ])


class FakeMetrics:
    """One real HTTP server per pod (port 0 = any free port) serving whatever page the test set."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self._runners: list[aiohttp.web.AppRunner] = []

    async def serve(self, pod: str) -> int:
        async def metrics(_: aiohttp.web.Request) -> aiohttp.web.Response:
            if pod not in self.pages:
                return aiohttp.web.Response(status=503, text="not ready")
            return aiohttp.web.Response(text=self.pages[pod], content_type="text/plain")

        app = aiohttp.web.Application()
        app.router.add_get("/metrics", metrics)
        runner = aiohttp.web.AppRunner(app, access_log=None)
        await runner.setup()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runners.append(runner)
        self.ports[pod] = runner.addresses[0][1]
        return self.ports[pod]

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()


async def create_pod(api: Api, owner: dict[str, Any], pod_name: str, port: int,
                     grpc_port: int | None = None) -> dict[str, Any]:
    """A running Pod as the StatefulSet/Job controller would make it from ``owner``'s template, at 127.0.0.1
    with its metrics on ``port`` (and its SetRole address on ``grpc_port``, default 50051)."""
    template = owner["spec"]["template"]
    annotations = {**(template["metadata"].get("annotations") or {}), resources.ANNOTATION_METRICS_PORT: str(port)}
    if grpc_port is not None:
        annotations[resources.ANNOTATION_GRPC_PORT] = str(grpc_port)
    body = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": NAMESPACE, "labels": dict(template["metadata"]["labels"]),
                         "annotations": annotations,
                         "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                              "name": owner["metadata"]["name"], "uid": "x", "controller": True}]},
            "spec": template["spec"],
            "status": {"phase": "Running", "podIP": "127.0.0.1"}}
    return await api.create(f"/api/v1/namespaces/{NAMESPACE}/pods", body)


# ---- fixtures ---------------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def kube_emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emulator, kmock.Server(emulator):
        emulator.resources.load_bundled()
        emulator.resources[f"{resources.GROUP}/{resources.VERSION}/{resources.PLURAL}"] = kmock.ResourceInfo(
            kind=resources.KIND, singular="rljob", namespaced=True, shortnames={"rlj"},
            verbs={"create", "get", "list", "watch", "patch", "update", "delete"}, subresources={"status"})
        yield emulator


@pytest.fixture
def kube_api(kube_emulator: Emulator) -> Api:
    return Api(kube_emulator)


@pytest.fixture
def role_recorder() -> RecordingRoleSetter:
    return RecordingRoleSetter()


@pytest_asyncio.fixture
async def metrics_pages() -> AsyncIterator[FakeMetrics]:
    fake = FakeMetrics()
    try:
        yield fake
    finally:
        await fake.close()


@pytest_asyncio.fixture
async def running_operator(kube_emulator: Emulator, role_recorder: RecordingRoleSetter) -> AsyncIterator[asyncio.Task]:
    """The operator (the real handlers module) running in this event loop against the emulator."""
    saved = handlers.OPTIONS
    handlers.OPTIONS = dataclasses.replace(saved, kube_server=str(kube_emulator.url), disable_scanning=True,
                                           prometheus_url=None, metrics_timeout=0.5, rpc_timeout=1.0,
                                           role_setter=role_recorder)
    stop, ready = asyncio.Event(), asyncio.Event()
    # kopf.operator() = spawn_tasks + run_tasks, which at exit cancels every task started since the operator
    # (here: pytest-asyncio's finalizer task and kmock's keep-alive connections), after a 5 s wait. The
    # exclusion set is read at exit, so the test's own tasks are added to it just before stopping.
    ignored: set[asyncio.Task] = set(asyncio.all_tasks())
    kube_before = handlers._KUBE
    tasks = await kopf.spawn_tasks(standalone=True, clusterwide=False, namespaces=[NAMESPACE],
                                   stop_flag=stop, ready_flag=ready)
    task = asyncio.create_task(kopf.run_tasks(tasks, ignored=ignored))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        # kopf is ready before its (sync) login handler has run in kopf's executor thread; that thread must not be
        # left running while this loop stands still between test phases: its first kubernetes Configuration()
        # registers the "client" logger while pytest's logging plugin walks logging's loggerDict at the next phase
        # ("RuntimeError: dictionary changed size during iteration" in contextlib's __enter__).
        async def logged_in() -> bool:
            return handlers._KUBE is not kube_before
        await eventually(logged_in, timeout=15, what="the operator's login handler")
        yield task
        assert not task.done(), "the operator exited during the test"
    finally:
        ignored.update(asyncio.all_tasks())
        stop.set()
        try:
            await asyncio.wait_for(task, 20)
        finally:
            handlers.OPTIONS = saved
