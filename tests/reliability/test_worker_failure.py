"""A rollout worker killed in the middle of a step: the requests it held unanswered are re-dispatched to the
others (seen going back to the queue), the step completes with every request answered exactly once, and the
worker rejoins at the next step."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.conftest import TINY_JOB
from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.rollout.worker import RequestQueue
from tlt.rpc.errors import RpcError
from tlt.serving.launcher import LocalServices


@pytest.mark.usefixtures("demo_drafter_dir")
def test_killed_worker_mid_step_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    spec = job_spec_from_dict(apply_overrides({}, {**TINY_JOB, "steps": 3, "data.heldout": 0,
                                                   "output_dir": str(tmp_path)}))
    events: list[dict] = []
    results: dict[int, list[str]] = {}
    step = {"n": 0}
    victim: list[int] = []
    handed_back: dict[int, list[str]] = {}  # by step: requests a failed worker's client put back in the queue
    put_back = RequestQueue.put_back

    def spy(queue: RequestQueue, requests: list) -> None:
        handed_back.setdefault(step["n"], []).extend(r.request_id for r in requests)
        put_back(queue, requests)

    monkeypatch.setattr(RequestQueue, "put_back", spy)
    services = LocalServices(spec)
    with services as addresses:
        target = services.procs["rollout-1"].pid

        def on_event(event: dict) -> None:
            events.append(event)
            if event["event"] == "rollout_start":
                step["n"] = event["step"]
            if event["event"] == "result":
                results.setdefault(step["n"], []).append(event["id"])
            # kill rollout-1 in step 2 when its own Progress shows it decoding: it holds unanswered requests then
            # (at its first answer it may hold none: on a busy machine rollout-0 can pull nearly all of them first)
            if event["event"] == "progress" and step["n"] == 2 and not victim and any(
                    w.name == "rollout-1" and w.running + w.queued > 0 for w in event["workers"]):
                victim.append(target)
                os.kill(target, signal.SIGKILL)

        controller = Controller(spec, on_event=on_event, services=addresses, supervisor=services.revive)
        records = controller.run()
    assert victim
    # the killed worker held unanswered requests: they went back to the queue, and the other worker answered them
    assert set(handed_back) == {2} and handed_back[2], handed_back
    assert set(handed_back[2]) <= set(results[2]) and len(set(handed_back[2])) == len(handed_back[2])
    expected = spec.data.prompts_per_step * spec.data.group_size
    for n in (1, 2, 3):
        assert len(results[n]) == expected and len(set(results[n])) == expected  # none lost, none twice
    by_step = {r["step"]: r for r in records}
    assert by_step[2]["failed_workers"] == ["rollout-1"]
    assert len(by_step[2]["response_lengths"]) == expected
    assert any(e["event"] == "worker_failed" and e["worker"] == "rollout-1" for e in events)
    assert not [e for e in events if e["event"] == "worker_down"], [e for e in events if e["event"] == "worker_down"]
    # revived before step 3: both workers took part again
    assert by_step[3]["failed_workers"] == [] and {r["worker"] for r in by_step[3]["roles"]} == {"rollout-0",
                                                                                                 "rollout-1"}


@pytest.mark.usefixtures("demo_drafter_dir")
def test_every_worker_lost_between_steps_fails_with_each_workers_error(tmp_path):
    """Both workers dead when the next step loads its versions, and nobody to restart them: the run stops with
    one error that names each worker and what its call answered."""
    spec = job_spec_from_dict(apply_overrides({}, {**TINY_JOB, "steps": 3, "data.heldout": 0,
                                                   "output_dir": str(tmp_path)}))
    services = LocalServices(spec)
    with services as addresses:
        pids = [services.procs[name].pid for name in ("rollout-0", "rollout-1")]

        def on_event(event: dict) -> None:
            if event["event"] == "step_end" and event["step"] == 1:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)

        controller = Controller(spec, on_event=on_event, services=addresses)
        with pytest.raises(RpcError) as caught:
            controller.run()
    message = str(caught.value)
    assert message.startswith("no rollout worker is reachable"), message
    for i, name in enumerate(("rollout-0", "rollout-1")):
        assert f"{name}: " in message and f"rollout worker at {addresses.rollout[i]}" in message, message
