"""Kill `tlt run` (SIGKILL; its services die with it) while a step's requests are in flight: rerunning the
same command resumes from the newest complete policy and drafter versions and the trainer's checkpoint, with
the step counter exact (the interrupted step is redone once)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import TINY_JOB
from tests.processes import alive, checkpoint_optimizer_steps, step_records
from tests.reliability.service_process import wait_for_rollout
from tlt.rollout.service import RemoteRolloutWorker
from tlt.store import ArtifactStore
from tlt.store.kinds import DRAFTER_KIND, POLICY_KIND

WORKERS = 2



def _command(run_dir, steps):
    job = {**TINY_JOB, "steps": steps, "data.heldout": 0, "rollout.workers": WORKERS}
    args = [f"--set={k}={v}" for k, v in job.items()]
    return [sys.executable, "-m", "tlt.cli", "run", *args, "--output-dir", str(run_dir), "--no-progress",
            "--no-report"]


@pytest.mark.usefixtures("demo_drafter_dir")
def test_sigkilled_run_leaves_no_orphans_and_resumes_exactly(tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "controller.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_command(run_dir, 4), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not all((run_dir / "services" / f"rollout-{i}.port").is_file() for i in range(WORKERS)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        ports = [json.loads((run_dir / "services" / f"rollout-{i}.port").read_text())["port"] for i in range(WORKERS)]
        workers = [RemoteRolloutWorker(f"127.0.0.1:{port}") for port in ports]
        try:
            wait_for_rollout(2, proc, run_dir, workers, log)  # kill it with step 2's requests in flight
        finally:
            for worker in workers:
                worker.close()
        per_step = checkpoint_optimizer_steps(run_dir)  # the checkpoint after step 1 holds one update
        pids = [json.loads(p.read_text())["pid"] for p in (run_dir / "services").glob("*.port")]
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "services outlived the killed controller"
    store = ArtifactStore(run_dir / "store")
    newest_drafter = store.latest(DRAFTER_KIND).version  # a publish under way may have finished as they drained

    out = subprocess.run(_command(run_dir, 4), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    # step 2 was redone once: nothing skipped or repeated in the log
    records = step_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert store.latest(POLICY_KIND).version == 4
    # the restarted drafter service went on from the newest drafter version, not from v0 again: the workers
    # loaded it and what it published since follows it (a step whose workers pushed no drafter work publishes none)
    why = [(r["step"], r["drafter_version"], r["new_drafter_version"]) for r in records]
    assert records[1]["drafter_version"] == newest_drafter, why
    since = [r["new_drafter_version"] for r in records[1:] if r["new_drafter_version"] is not None]
    assert since and since == list(range(newest_drafter + 1, newest_drafter + 1 + len(since))), why
    assert store.latest(DRAFTER_KIND).version == since[-1], why
    # the restarted trainer resumed from the step-1 checkpoint: one update per step, none lost or repeated
    assert checkpoint_optimizer_steps(run_dir) == 4 * per_step
