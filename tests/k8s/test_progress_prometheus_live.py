"""The operator's two progress sources agree on live pages: ScrapeSource reads the pods' /metrics directly,
PrometheusSource asks a real Prometheus server that scraped the same pages (with the ``namespace`` and ``pod``
labels Kubernetes relabelling adds). The pages come from the real exporters: two rollout workers on a tiny
model (one has finished requests, one was moved to the drafter role) and the controller's series."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp

from tlt.config import job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.drafter.warmup import new_drafter
from tlt.metrics import new_registry
from tlt.models import load_model
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.worker import RolloutWorker
from tlt.serving.http import MetricsServer
from tlt.store import ArtifactStore
from tlt_operator.progress import PrometheusSource, ScrapeSource, Snapshot, Target


def _controller_samples(phase: str, pending: int, step: int):
    """The real controller exporter, on a stand-in holding only the state it reads."""
    status = {"pending": pending, "unanswered": pending, "phase": phase, "last_step": {}, "reward_mean": 0.5,
              "heldout": None, "acceptance_length": 2.5, "policy_version": step, "drafter_version": 1}
    return Controller.metric_samples(SimpleNamespace(step=step, status=status, inproc=False, workers=[]))


async def _read_both(prom_url: str, controller: Target, workers: list[Target]) -> tuple[Snapshot, Snapshot]:
    async with aiohttp.ClientSession() as session:
        direct = await ScrapeSource(session, timeout=5).read("ns", "j", controller, workers)
        via_prometheus = await PrometheusSource(session, prom_url, timeout=5).read("ns", "j", controller, workers)
    return direct, via_prometheus


def test_prometheus_source_reads_what_the_pods_serve(peaky_model_dir, tmp_path, prometheus_factory):
    spec = job_spec_from_dict({"rollout": {"max_running": 4}, "drafter": {"init": "random"}})
    model = load_model(peaky_model_dir, dtype="float32")
    store = ArtifactStore(tmp_path / "store")
    workers = [RolloutWorker(f"j-rollout-{i}", model, spec, new_drafter(model, seed=i), store) for i in range(2)]
    workers[0].engine.generate([[1, 2, 3]] * 3, SamplingParams(max_new_tokens=4, seed=0))
    workers[1].set_role("drafter")
    state = {"phase": "rollout", "pending": 5}
    servers = [MetricsServer(0, "127.0.0.1", new_registry(w.metric_samples)) for w in workers]
    servers.append(MetricsServer(0, "127.0.0.1", new_registry(
        lambda: _controller_samples(state["phase"], state["pending"], step=3))))
    for server in servers:
        server.start()
    try:
        names = [w.name for w in workers] + ["j-controller-x7k2p"]
        prom = prometheus_factory({name: [f"127.0.0.1:{s.port}"] for name, s in zip(names, servers)},
                                  labels={name: {"namespace": "ns", "pod": name} for name in names})
        prom.wait_for_targets(timeout=30)
        prom.wait_for('tlt_controller_pending_requests{namespace="ns"} == 5', timeout=15)
        targets = [Target(w.name, "127.0.0.1", s.port) for w, s in zip(workers, servers)]
        controller = Target("j-controller-x7k2p", "127.0.0.1", servers[-1].port)

        direct, via_prometheus = asyncio.run(_read_both(prom.url, controller, targets))
        assert direct.workers["j-rollout-0"] is not None and direct.workers["j-rollout-0"].finished == 3
        assert direct.workers["j-rollout-1"].role == "drafter"
        assert direct.controller is not None and direct.controller.phase == "rollout"
        assert via_prometheus == direct
        assert via_prometheus.progress() == direct.progress() is not None

        # the next phase reaches the planner through Prometheus one scrape later
        state.update(phase="update", pending=0)
        prom.wait_for('tlt_controller_phase{namespace="ns",phase="update"} == 1', timeout=15)
        direct, via_prometheus = asyncio.run(_read_both(prom.url, controller, targets))
        assert via_prometheus == direct and via_prometheus.controller.phase == "update"
    finally:
        for server in servers:
            server.stop()
