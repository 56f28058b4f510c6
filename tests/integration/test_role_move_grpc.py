"""The role move end to end over real gRPC: a real ``tlt serve rollout`` process (the demo model, speculative
decoding off, free ports) is moved to the drafter role and back

* by the operator's :class:`~tlt_operator.role_setter.GrpcRoleSetter` directly, checked by the service's
  Progress RPC and its /metrics (``tlt_rollout_role{role="drafter"} 1``);
* by the operator itself (kopf against kmock, tests/k8s/operator_fixtures.py) with the real GrpcRoleSetter:
  the rollout Pod sits at 127.0.0.1 with its ``tlt.dev/grpc-port`` annotation on the real service, a fake
  controller page shows the long tail, and the worker's Progress RPC shows the role it was told.

What the real worker revealed (and how the operator part is adapted to it, the services left alone):

1. The operator scrapes ``/metrics?name[]=<series>...`` (progress.ScrapeSource); the services' callback collectors
   cannot describe their series in advance, so their registry must include them in name-filtered scrapes
   (``tlt.metrics.new_registry``). :func:`test_operator_scraper_reads_the_real_worker_page` checks that the
   operator's scraper reads a real worker's page.
2. With speculative decoding off a worker holds no finished responses for drafter training
   (``tlt_rollout_buffered_responses`` stays 0: no spot trainer), and the planner only moves a worker with at least
   ``drafter.min_responses`` (>= 1) of them, so such a worker is never moved on its own numbers (by design: it has
   no drafter to train). :func:`test_idle_worker_without_speculative_decoding_is_not_eligible` checks that.

So the operator reads the real worker's page through a pass-through proxy that reports
``drafter.min_responses`` buffered responses; everything else on the page (the role,
running and queued series the operator acts on and checks the move by) is the worker's own.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import aiohttp.web
import pytest
import pytest_asyncio

pytest.register_assert_rewrite("tests.k8s.operator_fixtures")

from tests.k8s.operator_fixtures import (  # noqa: E402
    NAMESPACE,
    RLJOBS,
    controller_page,
    create_pod,
    eventually,
    rljob_manifest,
)
from tests.processes import free_port  # noqa: E402
from tests.reliability.service_process import spawn_service  # noqa: E402
from tlt.rpc import convert  # noqa: E402
from tlt.rpc.client import open_channel, set_worker_role, wait_ready  # noqa: E402
from tlt.rpc.v1 import rollout_pb2, rollout_pb2_grpc  # noqa: E402
from tlt.store import ArtifactStore  # noqa: E402
from tlt_operator import planner, progress, resources  # noqa: E402
from tlt_operator.resources import LABEL_ROLE  # noqa: E402
from tlt_operator.role_setter import GrpcRoleSetter, RoleSetError  # noqa: E402

pytest_plugins = ["tests.k8s.operator_fixtures"]

JOB = "grpc"
WORKER = resources.rollout_pod_name(JOB, 0)  # the pod's name is the worker's --name (its metrics' worker label)
MIN_RESPONSES = 1


@dataclass
class RolloutService:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    stub: rollout_pb2_grpc.RolloutStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def progress_role(self) -> str:
        return convert.ROLE_FROM_PROTO[self.stub.Progress(rollout_pb2.ProgressRequest(), timeout=5).role]

    def scrape(self) -> list[progress.Sample]:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            return progress.parse_text(reply.read().decode())


@pytest.fixture(scope="module")
def rollout_service(tmp_path_factory, demo_model_dir) -> Iterator[RolloutService]:
    """``tlt serve rollout`` on free ports, speculative decoding off, the demo model published as policy v0."""
    tmp = tmp_path_factory.mktemp("role-move")
    store = ArtifactStore(tmp / "store")
    store.publish("policy", 0, {"model.safetensors": demo_model_dir / "model.safetensors",
                                "config.json": demo_model_dir / "config.json"})
    service = spawn_service("rollout", None, tmp, WORKER, "--set", "rollout.speculative.mode=off",
                            "--set", f"output_dir={tmp}").wait_serving(120)
    try:
        with open_channel(service.address) as channel:
            wait_ready(channel, service.address)
            yield RolloutService(service.proc, service.port, service.metrics_port,
                                 rollout_pb2_grpc.RolloutStub(channel))
    finally:
        service.stop()


def _role_series(samples: list[progress.Sample]) -> dict[str, float]:
    return {s.labels["role"]: s.value for s in samples
            if s.name == progress.ROLLOUT_ROLE and s.labels.get("worker") == WORKER}


def test_grpc_role_setter_moves_the_real_worker_and_back(rollout_service):
    service, setter = rollout_service, GrpcRoleSetter()
    assert service.progress_role() == "rollout"
    assert _role_series(service.scrape()) == {"rollout": 1.0, "drafter": 0.0}

    setter.set_role(service.address, "drafter", 5.0)
    assert service.progress_role() == "drafter"
    samples = service.scrape()
    assert _role_series(samples) == {"rollout": 0.0, "drafter": 1.0}  # tlt_rollout_role{role="drafter"} 1
    seen = progress.worker_metrics(samples, WORKER)  # what the operator makes of the page
    assert seen is not None and seen.role == "drafter" and (seen.running, seen.queued) == (0, 0)

    setter.set_role(service.address, "rollout", 5.0)
    assert service.progress_role() == "rollout"
    assert _role_series(service.scrape()) == {"rollout": 1.0, "drafter": 0.0}

    # Failures reach the operator as RoleSetError (it reverts the label and retries on the next tick).
    with pytest.raises(RoleSetError, match="SetRole"):
        setter.set_role(service.address, "trainer", 5.0)
    with pytest.raises(RoleSetError, match="SetRole"):
        setter.set_role(f"127.0.0.1:{free_port()}", "drafter", 1.0)
    assert service.progress_role() == "rollout"


# ---- what the operator makes of the real worker's page ----------------------------------------------------------


def _scrape_with_the_operator(service: RolloutService) -> progress.Snapshot:
    async def read() -> progress.Snapshot:
        async with aiohttp.ClientSession() as session:
            return await progress.ScrapeSource(session, 2.0).read(
                NAMESPACE, JOB, None, [progress.Target(WORKER, "127.0.0.1", service.metrics_port)])
    return asyncio.run(read())


def test_operator_scraper_reads_the_real_worker_page(rollout_service):
    worker = _scrape_with_the_operator(rollout_service).workers[WORKER]
    assert worker is not None and worker.role in ("rollout", "drafter")


def test_idle_worker_without_speculative_decoding_is_not_eligible(rollout_service):
    """Finding 2: the real page of an idle SD-off worker, as the operator parses it, gives the planner nothing to
    move (no buffered responses), even in the long tail."""
    set_worker_role(rollout_service.address, "rollout", 5.0)
    worker = progress.worker_metrics(rollout_service.scrape(), WORKER)
    assert worker is not None and worker.role == "rollout"
    assert (worker.running, worker.queued, worker.buffered_responses) == (0, 0, 0)
    tail = planner.JobProgress("rollout", 0, (worker.progress(), planner.WorkerProgress("busy", 3, 0, 0, 0)))
    assert planner.in_long_tail(tail)
    assert planner.plan_roles(tail, planner.PlannerConfig(min_responses=1))[WORKER] == "rollout"
    with_responses = planner.JobProgress("rollout", 0, (planner.WorkerProgress(WORKER, 0, 0, 0, 1),))
    assert planner.plan_roles(with_responses, planner.PlannerConfig(min_responses=1)) == {WORKER: "drafter"}


# ---- the operator, against kmock, moving the real worker -------------------------------------------------------


@pytest.fixture
def role_recorder() -> GrpcRoleSetter:
    """Overrides operator_fixtures' recording fake: ``running_operator`` gets the real gRPC role setter."""
    return GrpcRoleSetter()


_BUFFERED = re.compile(rf"^({progress.ROLLOUT_BUFFERED}\{{[^}}]*\}}) \S+$", re.MULTILINE)


@pytest_asyncio.fixture
async def metrics_proxy(rollout_service) -> AsyncIterator[int]:
    """The real worker's /metrics with ``tlt_rollout_buffered_responses`` = MIN_RESPONSES (finding 2); see the
    module doc."""
    async def metrics(_: aiohttp.web.Request) -> aiohttp.web.Response:
        async with aiohttp.ClientSession() as session, session.get(rollout_service.metrics_url) as reply:
            text = await reply.text()
        assert _BUFFERED.search(text), "the worker no longer exports tlt_rollout_buffered_responses"
        return aiohttp.web.Response(text=_BUFFERED.sub(rf"\g<1> {MIN_RESPONSES}.0", text), content_type="text/plain")

    app = aiohttp.web.Application()
    app.router.add_get("/metrics", metrics)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_operator_moves_the_real_worker_over_grpc(rollout_service, metrics_proxy, running_operator, kube_api,
                                                        metrics_pages):
    service = rollout_service
    await asyncio.to_thread(set_worker_role, service.address, "rollout", 5.0)
    await kube_api.create(RLJOBS, rljob_manifest(JOB, job={"name": JOB, "rollout": {"workers": 1},
                                                           "drafter": {"min_responses": MIN_RESPONSES}}))

    async def children():
        sts = await kube_api.child("StatefulSet", resources.rollout_name(JOB))
        job = await kube_api.child("Job", resources.controller_name(JOB))
        return (sts, job) if sts and job else None
    sts, job = await eventually(children, what="the StatefulSet and the controller Job")

    controller = f"{JOB}-controller-x"
    await create_pod(kube_api, job, controller, await metrics_pages.serve(controller))
    metrics_pages.pages[controller] = controller_page("rollout", pending=0, step=1)

    # The rollout pod: SetRole goes to the real service; its metrics through the proxy.
    await create_pod(kube_api, sts, WORKER, metrics_proxy, grpc_port=service.port)

    async def state():
        pod = await kube_api.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{WORKER}")
        return pod["metadata"]["labels"].get(LABEL_ROLE), await asyncio.to_thread(service.progress_role)

    async def is_(label, role):
        return await state() == (label, role)

    await eventually(lambda: is_("drafter", "drafter"), what="the pod labelled drafter and the worker told so")
    events = await eventually(lambda: kube_api.events(JOB, "RoleChanged"), what="a RoleChanged event")
    assert events[0]["message"] == f"{WORKER}: rollout -> drafter (long tail)"
    assert _role_series(await asyncio.to_thread(service.scrape)) == {"rollout": 0.0, "drafter": 1.0}
    assert not await kube_api.events(JOB, "RoleChangeFailed")

    # The next rollout: prompts pending again -> back to rollout, over the same gRPC path.
    metrics_pages.pages[controller] = controller_page("rollout", pending=8, step=2)
    await eventually(lambda: is_("rollout", "rollout"), what="the pod and the worker back to rollout")

    async def moved_back():
        return [e for e in await kube_api.events(JOB, "RoleChanged")
                if e["message"] == f"{WORKER}: drafter -> rollout (new rollout)"]
    await eventually(moved_back, what="the move-back event")
    assert not await kube_api.events(JOB, "RoleChangeFailed")
