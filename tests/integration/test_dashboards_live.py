"""Every query of every dashboard in dashboards/ returns data from a real Prometheus that scraped a short job.

A two-step adaptive-SD job runs across service processes (drafter, trainer, two rollout workers) with the
controller's metrics on a MetricsServer; Prometheus scrapes all of them every second. Then each panel query (and
each template variable's ``label_values`` selector), with Grafana's variables substituted as for "All", must give
a non-empty instant result, and a finite value somewhere over the job's time range (a ratio whose two sides never
match, or a rate that is never defined, would fail there).
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request

import pytest

from tests.integration.conftest import TINY_JOB
from tests.prometheus_server import PrometheusError, PrometheusServer
from tests.unit.test_dashboards import DASHBOARD_FILES, load, panel_queries, substitute, variable_queries
from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.drafter.spot import MICRO_BATCH
from tlt.serving.launcher import LocalServices

pytestmark = pytest.mark.slow  # 25-45 s on 2 cores: service start-up, a two-step job, then the queries

QUERY_TIMEOUT_S = 30.0  # after the job: enough for every counter to have several scrapes in a 30 s window


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable, variables substituted."""
    out = []
    for path in DASHBOARD_FILES:
        dash = load(path)
        out += [(f"{path.stem} / {title} [{ref}]", substitute(expr)) for title, ref, expr in panel_queries(dash)]
        out += [(f"{path.stem} / variable ${name}", substitute(expr)) for name, expr, _ in variable_queries(dash)]
    return out


def _query_range(prom: PrometheusServer, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1s"})
    with urllib.request.urlopen(f"{prom.url}/api/v1/query_range?{params}", timeout=10) as resp:
        payload = json.load(resp)
    assert payload["status"] == "success", payload
    return payload["data"]["result"]


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for series in result for _, v in series["values"])


def test_every_dashboard_query_returns_data(tmp_path, demo_drafter_dir, prometheus_factory):

    from tlt.metrics import new_registry
    from tlt.serving.http import MetricsServer

    spec = job_spec_from_dict(apply_overrides({}, {
        **TINY_JOB, "output_dir": str(tmp_path), "steps": 2, "data.heldout": 4, "rollout.workers": 2,
        "rollout.speculative.mode": "adaptive", "drafter.min_responses": 1,
        # one micro-batch per drafter step: a step cannot be preempted part-way, so the first one reports a loss
        # (a part-step keeps the last full loss, and a stint of part-steps alone leaves the loss panel empty)
        "drafter.batch_size": MICRO_BATCH,
    }))
    queries = _queries()
    services = LocalServices(spec)
    with services as addresses:
        controller = Controller(spec, services=addresses)
        registry = new_registry(controller.metric_samples)
        with MetricsServer(0, "127.0.0.1", registry) as http:
            targets = {name: [f"127.0.0.1:{port}"] for name, port in services.metrics_ports.items()}
            prom = prometheus_factory({**targets, "controller": [f"127.0.0.1:{http.port}"]}, scrape_interval="1s")
            prom.wait_for_targets(timeout=30)
            start = time.time()
            records = controller.run()
            assert [r["step"] for r in records] == [1, 2]
            # the drafter panels need a long tail in which some worker trained the drafter and pushed a delta
            assert any(r["drafter_train"]["pushes"] and r["drafter_train"]["loss"] is not None for r in records), \
                [(r["roles"], r["drafter_train"]) for r in records]
            prom.wait_for("tlt_controller_step == 2", timeout=15)
            # the per-batch-size counter splits each worker's SD on/off counter exactly (one snapshot per scrape)
            split = {(r["metric"]["worker"], r["metric"]["sd"]): float(r["value"][1]) for r in prom.query(
                "sum by (worker, sd) (tlt_rollout_batch_decode_iterations_total)")}
            whole = {(r["metric"]["worker"], r["metric"]["sd"]): float(r["value"][1]) for r in prom.query(
                "sum by (worker, sd) (tlt_rollout_decode_iterations_total)")}
            assert split == whole and sum(n for (_, sd), n in split.items() if sd == "on") > 0, (split, whole)

            # instant queries: poll until each has a result (rates need two scrapes of a series)
            pending, invalid = dict(queries), {}
            deadline = time.monotonic() + QUERY_TIMEOUT_S
            while pending:
                for where, expr in list(pending.items()):
                    try:
                        found = prom.query(expr)
                    except PrometheusError as exc:  # bad PromQL: report it with the others
                        invalid[where], found = str(exc), True
                    if found:
                        del pending[where]
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            time.sleep(2.5)  # two more scrapes: a series first seen at the deadline also lands in the range query
            end = time.time()
            never_finite = [where for where, expr in queries if where not in pending and where not in invalid
                            and not _finite(_query_range(prom, expr, start, end))]
    problems = [f"  invalid: {w}: {e}" for w, e in invalid.items()]
    problems += [f"  no data: {w}: {e}" for w, e in pending.items()]
    problems += [f"  never finite during the job: {w}: {dict(queries)[w]}" for w in never_finite]
    assert not problems, f"{len(problems)} of {len(queries)} dashboard queries failed:\n" + "\n".join(problems)
