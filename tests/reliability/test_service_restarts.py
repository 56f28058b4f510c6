"""The trainer and the drafter service killed in the middle of a run: the controller waits for their
restart, puts the trainer back to the last checkpoint and redoes the interrupted update, the drafter
service resumes from the newest drafter version, and the job ends with the step counter exact."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.conftest import TINY_JOB
from tests.processes import checkpoint_optimizer_steps
from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.serving.launcher import LocalServices
from tlt.store import ArtifactStore
from tlt.store.kinds import DRAFTER_KIND, POLICY_KIND


@pytest.mark.usefixtures("demo_drafter_dir")
def test_killed_trainer_and_drafter_services_restart_and_the_job_goes_on_exactly(tmp_path):
    # Drafter training also in every update phase, pushing after each drafter step: a tiny step's rollout may
    # have no long tail at all (both workers finish together), and then nothing would show that the restarted
    # drafter service takes pushes and publishes again. The update of step 3 (after the restart) always trains.
    spec = job_spec_from_dict(apply_overrides({}, {**TINY_JOB, "steps": 4, "data.heldout": 0,
                                                   "drafter.train_during_update": True, "drafter.push_every": 1,
                                                   "output_dir": str(tmp_path)}))
    events: list[dict] = []
    killed: list[tuple[str, int]] = []
    per_step: list[int] = []
    services = LocalServices(spec)

    def kill(name: str) -> None:
        pid = services.procs[name].pid
        killed.append((name, pid))
        os.kill(pid, signal.SIGKILL)
        services.procs[name].wait()

    with services as addresses:
        def on_event(event: dict) -> None:
            events.append(event)
            kind, step = event["event"], event.get("step")
            if kind == "step_end" and step == 1:
                per_step.append(checkpoint_optimizer_steps(tmp_path))
            if kind == "train_start" and step == 2:
                kill("trainer")  # its TrainStep finds nobody: restore the step-1 checkpoint, train again
            if kind == "rollout_start" and step == 3:
                kill("drafter")  # pushes fail during the rollout, the publish after it waits for the restart
            if kind == "rollout_start" and step == 4:
                kill("trainer")  # dies while idle: found out before the update

        controller = Controller(spec, on_event=on_event, services=addresses, supervisor=services.revive)
        records = controller.run()
        assert all(p.poll() is None for p in services.procs.values())  # everyone restarted and still serving

    assert [name for name, _ in killed] == ["trainer", "drafter", "trainer"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    downs = [(e["service"]) for e in events if e["event"] == "service_down"]
    backs = [(e["service"]) for e in events if e["event"] == "service_back"]
    assert downs == backs == ["trainer", "drafter", "trainer"], events
    # exactly one GRPO update per step was kept: the interrupted ones were rolled back and redone once
    assert checkpoint_optimizer_steps(tmp_path) == 4 * per_step[0]
    store = ArtifactStore(tmp_path / "store")
    assert store.latest(POLICY_KIND).version == 4
    assert all(r["trainer"] for r in records)  # no update's metrics were lost
    drafters = store.versions(DRAFTER_KIND)
    assert drafters and drafters == sorted(set(drafters))
    for version in drafters[-2:]:
        assert store.load_tensors(DRAFTER_KIND, version)  # complete and verified
    # the drafter service came back from the newest version and kept publishing after its restart
    loaded = [r["drafter_version"] for r in records]
    published = [r["new_drafter_version"] for r in records]
    why = (loaded, published, [r["drafter_train"] for r in records])
    assert loaded == sorted(loaded) and published[3] is not None and published[3] > max(loaded), why
    assert published[3] == drafters[-1], why
    third = records[2]["drafter_train"]  # with the drafter service gone, its workers' pushes failed softly
    assert third["pushes"] == 0 and (third["failed_pushes"] > 0) == (third["steps"] > 0), why
