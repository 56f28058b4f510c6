"""The controller alone killed (SIGKILL) mid-rollout while its services keep running, as in a cluster where
the pods survive and the controller's Job is restarted: the same `tlt run` against the same services resumes
from the newest complete policy and drafter versions with the step counter exact, and the services take the
new controller (a rollout service frees its one-stream-at-a-time slot when the dead controller's stream goes)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import TINY_JOB
from tests.processes import checkpoint_optimizer_steps, scrape, step_records
from tests.reliability.service_process import ServiceProcess, spawn_service, wait_for_rollout
from tlt.config import apply_overrides, job_spec_from_dict
from tlt.metrics import RPC_HANDLED
from tlt.rollout.service import RemoteRolloutWorker
from tlt.store import STAGING_PREFIX, ArtifactStore
from tlt.store.kinds import DRAFTER_KIND, POLICY_KIND

STEPS = 4
WORKERS = 2
TIMEOUT_S = 600.0



def _generate_calls(service: ServiceProcess) -> dict[str, float]:
    """Generate streams a rollout service has finished, by status code (from its /metrics)."""
    return {sample.labels["code"]: sample.value for sample in scrape(service.metrics_port, RPC_HANDLED.name)
            if sample.name.endswith("_total") and sample.labels.get("method") == "Generate"}


def _run_command(config: Path, services: dict[str, ServiceProcess]) -> list[str]:
    rollouts = [arg for i in range(WORKERS) for arg in ("--rollout", services[f"rollout-{i}"].address)]
    return [sys.executable, "-m", "tlt.cli", "run", str(config), *rollouts, "--drafter", services["drafter"].address,
            "--trainer", services["trainer"].address, "--no-progress", "--no-report"]


@pytest.mark.usefixtures("demo_drafter_dir")
def test_controller_killed_alone_resumes_against_the_same_running_services(tmp_path):
    run_dir = tmp_path / "run"
    spec = job_spec_from_dict(apply_overrides({}, {**TINY_JOB, "steps": STEPS, "data.heldout": 0,
                                                   "rollout.workers": WORKERS, "output_dir": str(run_dir)}))
    run_dir.mkdir()
    config = run_dir / "job.yaml"
    config.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    service_dir = tmp_path / "services"  # not under the run: it belongs to the (surviving) services
    services: dict[str, ServiceProcess] = {}
    with contextlib.ExitStack() as stack:
        for kind in ("trainer", "drafter"):
            services[kind] = spawn_service(kind, config, service_dir)
            stack.callback(services[kind].stop)
        for service in services.values():
            service.wait_serving()
        for i in range(WORKERS):
            name = f"rollout-{i}"
            services[name] = spawn_service("rollout", config, service_dir, name, "--drafter",
                                           services["drafter"].address)
            stack.callback(services[name].stop)
        for service in services.values():
            service.wait_serving()
        pids = {name: s.proc.pid for name, s in services.items()}
        workers = [RemoteRolloutWorker(services[f"rollout-{i}"].address) for i in range(WORKERS)]
        for worker in workers:
            stack.callback(worker.close)

        log = tmp_path / "controller-1.log"
        with open(log, "wb") as out:
            controller = subprocess.Popen(_run_command(config, services), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_rollout(2, controller, run_dir, workers, log)
            per_step = checkpoint_optimizer_steps(run_dir)  # the checkpoint after step 1 holds one update
            controller.kill()
            controller.wait()
        finally:
            if controller.poll() is None:
                controller.kill()
                controller.wait()
        store = ArtifactStore(spec.store_uri)
        newest_drafter = store.latest(DRAFTER_KIND).version
        assert store.latest(POLICY_KIND).version == 1 and [r["step"] for r in step_records(run_dir)] == [1]
        assert all(s.proc.poll() is None for s in services.values()), "a service died with the controller"

        second = subprocess.run(_run_command(config, services), capture_output=True, text=True, timeout=TIMEOUT_S)
        assert second.returncode == 0, second.stdout + second.stderr

        # the services were never restarted: same processes, still serving
        assert {name: s.proc.pid for name, s in services.items()} == pids
        assert all(s.proc.poll() is None for s in services.values())
        assert all(w.progress().name == f"rollout-{i}" for i, w in enumerate(workers))
        generate_calls = {f"rollout-{i}": _generate_calls(services[f"rollout-{i}"]) for i in range(WORKERS)}

    records = step_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), records  # step 2 redone once
    redone = records[1]
    why = [(r["step"], r["policy_version"], r["drafter_version"], r["new_drafter_version"]) for r in records]
    # resumed from the newest complete versions: policy v1, and the drafter version newest when it was killed
    assert redone["policy_version"] == 1 and redone["drafter_version"] == newest_drafter, why
    # the drafter service went on from there: what it published since only follows that version (a step whose
    # workers pushed no drafter work publishes none)
    since = [r["new_drafter_version"] for r in records[1:] if r["new_drafter_version"] is not None]
    assert since and since == list(range(newest_drafter + 1, newest_drafter + 1 + len(since))), why
    assert store.latest(DRAFTER_KIND).version == since[-1], why
    # every worker took part in the redone and later steps: its Generate slot was free for the new controller,
    # whose every stream it took at once (one per step: step 1 from the dead controller, 2..N from the new one)
    for record in records[1:]:
        assert record["failed_workers"] == [], record["failed_workers"]
        assert {r["worker"] for r in record["roles"]} == {f"rollout-{i}" for i in range(WORKERS)}, record["roles"]
    for name, calls in generate_calls.items():
        assert calls.get("OK") == STEPS and "FAILED_PRECONDITION" not in calls, (name, calls)
    assert checkpoint_optimizer_steps(run_dir) == STEPS * per_step  # one update per step, none repeated or lost
    assert store.latest(POLICY_KIND).version == STEPS
    for kind in (POLICY_KIND, DRAFTER_KIND):
        assert not [p.name for p in Path(store.root, kind).iterdir() if p.name.startswith(STAGING_PREFIX)]
