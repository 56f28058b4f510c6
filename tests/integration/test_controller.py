"""The RL loop on the demo model: a short job end to end, exact resume, and the `tlt run` CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.integration.conftest import TINY_JOB
from tests.processes import step_records
from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.store import ArtifactStore
from tlt.store.kinds import POLICY_KIND


def _spec(tmp_path, **extra):
    return job_spec_from_dict(apply_overrides({}, {**TINY_JOB, "output_dir": str(tmp_path / "run"), **extra}))


@pytest.mark.usefixtures("demo_drafter_dir")
def test_job_runs_and_resumes_exactly(tmp_path):
    spec = _spec(tmp_path)
    first = Controller(spec)
    records = first.run()
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert len(r["response_lengths"]) == 16
        assert r["sd"]["mode"] == "adaptive" and r["sd"]["num_drafts"] > 0
        assert {w["worker"] for w in r["roles"]} == {"rollout-0", "rollout-1"}
        assert r["trainer"]["tokens"] == sum(r["response_lengths"])
    store = ArtifactStore(spec.store_uri)
    assert store.latest(POLICY_KIND).version == 2
    # Crash after the step-2 checkpoint but before its policy was published: the version is missing.
    store.fs.rm(store._version_dir(POLICY_KIND, 2), recursive=True)
    (tmp_path / "run" / "store" / "policy" / "LATEST").unlink()
    resumed = Controller(_spec(tmp_path, steps=3))
    assert resumed.step == 2 and resumed.trainer.optimizer_steps == 2
    assert store.latest(POLICY_KIND).version == 2  # republished from the checkpoint
    resumed.run()
    assert [r["step"] for r in step_records(tmp_path / "run")] == [1, 2, 3]
    assert store.latest(POLICY_KIND).version == 3 and resumed.trainer.optimizer_steps == 3


def test_fresh_job_refuses_a_foreign_store(tmp_path):
    from tlt.errors import ConfigError

    spec = _spec(tmp_path, **{"rollout.speculative.mode": "off"})
    ArtifactStore(spec.store_uri).publish(POLICY_KIND, 0, {"config.json": b"{}"})
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        Controller(spec)


@pytest.mark.usefixtures("demo_drafter_dir")
def test_cli_run_writes_log_and_report(tmp_path):
    args = [f"--set={k}={v}" for k, v in {**TINY_JOB, "steps": 1}.items()]
    out = subprocess.run([sys.executable, "-m", "tlt.cli", "run", *args, "--output-dir", str(tmp_path / "cli"),
                          "--no-progress"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "step 1: reward" in out.stdout and "report:" in out.stdout
    report = (tmp_path / "cli" / "report" / "report.md").read_text()
    assert "### Worker roles" in report and "](roles.png)" in report


@pytest.mark.parametrize(("arg", "needle"), [
    ("--set=rollout.workers=0", "rollout.workers must be >= 1"),
    ("--set=rollout.speculative.mode=maybe", "rollout.speculative.mode must be one of"),
    ("--set=data.source=/nope.jsonl", "does not exist"),
])
def test_cli_bad_spec_is_one_clear_line(tmp_path, arg, needle):
    out = subprocess.run([sys.executable, "-m", "tlt.cli", "run", arg, "--output-dir", str(tmp_path / "x"),
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_cli_cuda_without_a_gpu_is_one_clear_line_before_services_start(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tlt.cli", "run", "--set=model.device=cuda", "--output-dir",
                          str(tmp_path / "x"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "model.device is 'cuda' but torch sees no CUDA device" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "x" / "services").exists()  # refused before any service process started


def test_crashes_around_the_checkpoint_commit_lose_and_repeat_nothing(tmp_path, monkeypatch):
    """The trainer checkpoint and controller.json are one commit, and the step's record survives in it."""
    spec = _spec(tmp_path, **{"rollout.speculative.mode": "off"})
    ckpt = tmp_path / "run" / "checkpoint"
    first = Controller(spec)
    tuner_state = Controller._tuner_state

    def killed_before_the_commit(self, worker):  # runs after the trainer saved step 2, before controller.json
        if self.step == 2:
            raise KeyboardInterrupt("killed between the trainer checkpoint and controller.json")
        return tuner_state(self, worker)

    monkeypatch.setattr(Controller, "_tuner_state", killed_before_the_commit)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    monkeypatch.undo()
    assert (ckpt / "trainer-000002").is_dir()  # written, never committed
    per_step = first.trainer.optimizer_steps // 2

    second = Controller(spec)
    assert second.step == 1 and second.trainer.optimizer_steps == per_step  # step 2's update is not kept twice
    assert not (ckpt / "trainer-000002").exists()
    append = Controller._append

    def killed_before_the_record(path, record):  # runs after step 2 was committed
        if record.get("step") == 2 and "event" not in record:
            raise KeyboardInterrupt("killed before the step record was written")
        append(path, record)

    monkeypatch.setattr(Controller, "_append", staticmethod(killed_before_the_record))
    with pytest.raises(KeyboardInterrupt):
        second.run()
    monkeypatch.undo()

    third = Controller(_spec(tmp_path, steps=3, **{"rollout.speculative.mode": "off"}))
    assert third.step == 2
    third.run()
    records = step_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["recovered"] and records[1]["reward_mean"] is not None and records[1]["wall_s"] is None
    assert third.trainer.optimizer_steps == 3 * per_step
    assert sorted(p.name for p in ckpt.iterdir()) == ["controller.json", "trainer-000003"]
