"""Record every Kubernetes API request the operator makes, and authorize it the way the API server does.

kmock keeps every request it served (iterating the emulator yields them, with method, URL, query and headers);
the test's own client (:class:`TaggedApi`) marks its requests with a header, so everything else came from the
operator: kopf (``User-Agent: kopf/...``) and the kubernetes client behind the handlers
(``OpenAPI-Generator/...``).

:func:`authorize` turns a request into what RBAC checks, following the API server's ``RequestInfoFactory``:
``(apiGroup, resource[/subresource], verb)``, with GET of one object = get, GET of a collection = list
(``?watch=true`` = watch), POST = create, PATCH = patch (any patch type, server-side apply included),
PUT = update, DELETE = delete (of a collection = deletecollection). Requests outside ``/api/v1`` and
``/apis/<group>/<version>`` resources (discovery, ``/version``) are non-resource URLs, which every
authenticated user may GET through the default ``system:discovery`` ClusterRole.

:func:`operator_session` starts an emulator + the real operator (``tlt_operator.handlers``) in one of the modes
the Helm chart can run it in (:class:`OperatorMode`): cluster-wide (``--all-namespaces``) or namespaced
(``--namespace``), standalone or with kopf peering, with or without kopf's resource/namespace scanning.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any, NamedTuple

import aiohttp.web
import kmock
import kopf

from tests.k8s.operator_fixtures import NAMESPACE, Api, Emulator, FakeMetrics, RecordingRoleSetter
from tlt_operator import handlers, rbac, resources

TEST_CLIENT_HEADER = "X-TLT-Test-Client"
OPERATOR_USER_AGENTS = ("kopf/", "OpenAPI-Generator/")

#: Non-resource URLs the default ``system:discovery`` / ``system:public-info-viewer`` ClusterRoles grant every
#: authenticated user (GET only).
DISCOVERY_URLS = ("/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz", "/openapi",
                  "/openapi/*", "/version", "/version/")


class Access(NamedTuple):
    """What the API server authorizes for one request. ``resource`` is empty for a non-resource URL, whose
    path is then in ``path``; ``namespace`` is None for cluster-scoped and all-namespaces requests."""

    api_group: str
    resource: str
    verb: str
    namespace: str | None = None
    name: str | None = None
    path: str = ""

    @property
    def triple(self) -> tuple[str, str, str]:
        return self.api_group, self.resource, self.verb

    @property
    def non_resource(self) -> bool:
        return not self.resource


_VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_NAMESPACE_SUBRESOURCES = {"status", "finalize"}


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() not in ("", "0", "false")


def authorize(method: str, path: str, query: dict[str, str] | None = None) -> Access:
    """The RBAC attributes of ``method path?query`` (k8s.io/apiserver RequestInfoFactory.NewRequestInfo)."""
    query = query or {}
    verb = _VERBS.get(method.upper(), method.lower())
    parts = [p for p in path.strip("/").split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        rest = []
    if not rest:  # /api, /api/v1, /apis, /apis/<group>[/<version>], /version, ...
        return Access("", "", verb, path=path)
    if rest[0] == "watch":  # the legacy /watch/ prefix
        verb, rest = "watch", rest[1:]
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else None
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    if resource == "namespaces":  # a Namespace object is cluster-scoped; its name is not a namespace
        namespace = None
    if name is None and verb == "get":
        verb = "watch" if _truthy(query.get("watch")) else "list"
    elif name is None and verb == "delete":
        verb = "deletecollection"
    return Access(group, resource, verb, namespace, name, path)


def discovery_allowed(access: Access) -> bool:
    return access.non_resource and access.verb == "get" and any(
        fnmatch.fnmatchcase(access.path, pattern) if "*" in pattern else access.path == pattern
        for pattern in DISCOVERY_URLS)


# ---- the modes the chart runs the operator in, and what the chart grants in each ------------------------


@dataclasses.dataclass(frozen=True)
class OperatorMode:
    """How the chart starts kopf: ``--all-namespaces`` (clusterwide) or ``--namespace=default``;
    ``--standalone`` or ``--peering=<name>``; scanning off = ``TLT_OPERATOR_DISABLE_SCANNING=1``."""

    name: str
    clusterwide: bool
    peering: str | None = None
    scanning: bool = True

    @property
    def namespaces(self) -> tuple[str, ...]:
        return () if self.clusterwide else (NAMESPACE,)


def denied(access: Access, mode: OperatorMode) -> str | None:
    """Why the chart's RBAC (templates/rbac.yaml over :data:`tlt_operator.rbac.OPERATOR_RBAC_RULES`) would
    refuse ``access`` in ``mode``, or None when it is allowed."""
    if access.non_resource:
        return None if discovery_allowed(access) else "a non-resource URL outside system:discovery"
    peering = mode.peering is not None
    if not rbac.allows(access.api_group, access.resource, access.verb, peering=peering):
        return "not in OPERATOR_RBAC_RULES"
    key = (access.api_group, access.resource.split("/")[0])
    # The chart grants the peering kind of its mode only: ClusterKopfPeerings cluster-wide, KopfPeerings in the
    # watched namespaces.
    if key == ("kopf.dev", "kopfpeerings") and mode.clusterwide:
        return "KopfPeerings are granted in namespaced mode only"
    if key == ("kopf.dev", "clusterkopfpeerings") and not mode.clusterwide:
        return "ClusterKopfPeerings are granted in cluster-wide mode only"
    if mode.clusterwide or key in rbac.CLUSTER_SCOPED:
        return None  # ClusterRoleBindings
    if access.namespace is None:
        return "an all-namespaces request, but the namespaced rules are bound per watched namespace only"
    if access.namespace not in mode.namespaces:
        return f"namespace {access.namespace} is not watched (no RoleBinding there)"
    return None


# ---- recording ----------------------------------------------------------------------------------------------


class Recorded(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    user_agent: str

    @property
    def access(self) -> Access:
        return authorize(self.method, self.path, self.query)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted(self.query.items()))
        return f"{self.method} {self.path}{'?' + query if query else ''} ({self.user_agent})"


def operator_requests(emulator: kmock.KubernetesEmulator) -> list[Recorded]:
    """Every request the emulator served that did not come from the test's own :class:`TaggedApi`."""
    out = []
    for request in list(emulator):
        headers = {k.lower(): v for k, v in request.headers.items()}
        if TEST_CLIENT_HEADER.lower() in headers:
            continue
        method = request.method.value if hasattr(request.method, "value") else str(request.method)
        out.append(Recorded(method.upper(), request.url.path, dict(request.params), headers.get("user-agent", "")))
    return out


class TaggedApi(Api):
    """The test's side of the API (:class:`tests.k8s.operator_fixtures.Api`), its requests marked as the test's."""

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {TEST_CLIENT_HEADER: "1"}
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        reply = await self.k.request(method, path, **kwargs)
        async with reply:
            text = await reply.text()
        return reply.status, (json.loads(text) if text else None)


# ---- the operator in a mode ------------------------------------------------------------------------------


class RecordingEmulator(Emulator):
    """The operator tests' emulator plus the Namespace collection, which kmock 0.8 cannot route (its path parser
    fails on ``/api/v1/namespaces`` with a 500): kopf lists and watches it in namespaced mode with scanning on.
    The requests are recorded like all others; the list holds :attr:`namespaces`, the watch stays quiet."""

    namespaces: tuple[str, ...] = (NAMESPACE,)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path = raw_request.path.rstrip("/")
        if path not in ("/api/v1/namespaces", "/api/v1/watch/namespaces"):
            return await super().__call__(raw_request)
        await raw_request.read()
        self._requests.append(kmock.Request(id=len(self._requests), method=raw_request.method, url=raw_request.url,
                                            params=dict(raw_request.query), headers=dict(raw_request.headers)))
        if "/watch/" in path or _truthy(raw_request.query.get("watch")):
            response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(raw_request)
            while raw_request.transport is not None and not raw_request.transport.is_closing():
                await asyncio.sleep(0.1)
            return response
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "resourceVersion": "1"}}
                 for name in self.namespaces]
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "NamespaceList",
                                          "metadata": {"resourceVersion": "1"}, "items": items})



PEERING_KINDS = {True: ("clusterkopfpeerings", "ClusterKopfPeering"), False: ("kopfpeerings", "KopfPeering")}


@dataclasses.dataclass
class Session:
    mode: OperatorMode
    emulator: RecordingEmulator
    api: TaggedApi
    pages: FakeMetrics
    roles: RecordingRoleSetter

    def requests(self) -> list[Recorded]:
        return operator_requests(self.emulator)


@contextlib.asynccontextmanager
async def operator_session(mode: OperatorMode, role_setter: Any = None) -> AsyncIterator[Session]:
    """A fresh emulator (as the ``kube_emulator`` fixture, plus the Namespace list and, with peering, kopf's
    peering resources and the peering object the chart creates) and the operator running against it in ``mode``,
    in the current event loop; ``role_setter`` defaults to a :class:`RecordingRoleSetter`."""
    async with RecordingEmulator() as emulator, kmock.Server(emulator):
        emulator.resources.load_bundled()
        emulator.resources[f"{resources.GROUP}/{resources.VERSION}/{resources.PLURAL}"] = kmock.ResourceInfo(
            kind=resources.KIND, singular="rljob", namespaced=True, shortnames={"rlj"},
            verbs={"create", "get", "list", "watch", "patch", "update", "delete"}, subresources={"status"})
        api = TaggedApi(emulator)
        if mode.peering is not None:
            for cluster, (plural, kind) in PEERING_KINDS.items():  # the chart's CRDs: no status subresource
                emulator.resources[f"kopf.dev/v1/{plural}"] = kmock.ResourceInfo(
                    kind=kind, singular=kind.lower(), namespaced=not cluster,
                    verbs={"create", "get", "list", "watch", "patch", "update", "delete"})
            plural, kind = PEERING_KINDS[mode.clusterwide]
            meta = {"name": mode.peering} if mode.clusterwide else {"name": mode.peering, "namespace": NAMESPACE}
            prefix = "/apis/kopf.dev/v1" if mode.clusterwide else f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}"
            await api.create(f"{prefix}/{plural}", {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": meta})

        roles = RecordingRoleSetter()
        pages = FakeMetrics()
        saved = handlers.OPTIONS
        handlers.OPTIONS = dataclasses.replace(saved, kube_server=str(emulator.url), disable_scanning=not mode.scanning,
                                               prometheus_url=None, metrics_timeout=0.5, rpc_timeout=1.0,
                                               role_setter=role_setter or roles)
        stop, ready = asyncio.Event(), asyncio.Event()
        ignored: set[asyncio.Task] = set(asyncio.all_tasks())  # see operator_fixtures.running_operator
        try:
            tasks = await kopf.spawn_tasks(standalone=mode.peering is None, peering_name=mode.peering,
                                           clusterwide=mode.clusterwide, namespaces=list(mode.namespaces),
                                           stop_flag=stop, ready_flag=ready)
            task = asyncio.create_task(kopf.run_tasks(tasks, ignored=ignored))
            try:
                await asyncio.wait_for(ready.wait(), 15)
                yield Session(mode, emulator, api, pages, roles)
                assert not task.done(), "the operator exited during the test"
            finally:
                ignored.update(asyncio.all_tasks())
                stop.set()
                await asyncio.wait_for(task, 20)
        finally:
            handlers.OPTIONS = saved
            await pages.close()


def triples(accesses: Iterable[Access]) -> set[tuple[str, str, str]]:
    return {a.triple for a in accesses if not a.non_resource}
