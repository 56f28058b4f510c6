"""Kill the controller (and with it every service) at any moment: rerunning the same command resumes
from the newest complete versions in the store, with the step counter exact."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import TINY_JOB
from tests.processes import alive, step_records
from tlt.controller.loop import POLICY_KIND
from tlt.store import ArtifactStore


def _command(run_dir, steps):
    args = [f"--set={k}={v}" for k, v in {**TINY_JOB, "steps": steps, "data.heldout": 0}.items()]
    return [sys.executable, "-m", "tlt.cli", "run", *args, "--output-dir", str(run_dir), "--no-progress",
            "--no-report"]


@pytest.mark.usefixtures("demo_drafter_dir")
def test_sigkilled_run_leaves_no_orphans_and_resumes_exactly(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_command(run_dir, 4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while [r["step"] for r in step_records(run_dir)] != [1]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    time.sleep(1.0)  # somewhere inside step 2
    pids = [json.loads(p.read_text())["pid"] for p in (run_dir / "services").glob("*.port")]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "services outlived the killed controller"

    out = subprocess.run(_command(run_dir, 4), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    # step 2 was redone once: nothing skipped or repeated in the log
    assert [r["step"] for r in step_records(run_dir)] == [1, 2, 3, 4]
    store = ArtifactStore(run_dir / "store")
    assert store.latest(POLICY_KIND).version == 4
