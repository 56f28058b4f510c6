"""A worker in the drafter role, training, gets a request (one re-dispatched from a failed worker): it stops
training within a micro-batch and decodes it at once, still in the drafter role (the planner moves it back
only when it sees it busy), then trains again once it is idle."""

from __future__ import annotations

import threading
import time

import pytest

from tlt.config import job_spec_from_dict
from tlt.drafter.aggregator import trainable_state
from tlt.drafter.warmup import new_drafter
from tlt.models import load_model
from tlt.rollout.sampling import SamplingParams
from tlt.rollout.worker import RequestQueue, RolloutRequest, RolloutWorker
from tlt.store import ArtifactStore

WAIT_S = 60.0


def _eventually(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {WAIT_S:g} s"
        time.sleep(0.02)


@pytest.fixture
def spot_worker(peaky_model_dir, tmp_path) -> tuple[RolloutWorker, list[int]]:
    """A worker that trains its drafter online; returns it and the tokens of each delta it pushed."""
    spec = job_spec_from_dict({
        "rollout": {"max_running": 2, "speculative": {"mode": "adaptive", "strategies": ["2_1_3"]}},
        "drafter": {"init": "random", "online_training": True, "push_every": 1, "batch_size": 2,
                    "min_responses": 1},
    })
    model = load_model(peaky_model_dir, dtype="float32")
    pushes: list[int] = []
    base: dict = {}
    worker = RolloutWorker("w", model, spec, new_drafter(model, seed=1), ArtifactStore(tmp_path / "store"),
                           push_delta=lambda name, delta, tokens, base_version: pushes.append(tokens),
                           drafter_base=lambda: (0, base))
    base.update(trainable_state(worker.drafter))
    return worker, pushes


def test_a_request_for_a_training_worker_is_decoded_at_once(spot_worker):
    worker, pushes = spot_worker
    params = SamplingParams(max_new_tokens=6, seed=3)
    queue = RequestQueue([RolloutRequest(f"r{i}", [3, 4, 5 + i], params, 0) for i in range(2)], workers=1)
    step_over = threading.Event()
    answered: list[tuple[str, str]] = []  # (request, the worker's role when it was answered)
    outcome: list = []  # what run_rollout returned (its step summary) or raised

    def on_result(request: RolloutRequest, out) -> None:
        answered.append((request.request_id, worker.role))
        if len(answered) == 2:
            worker.set_role("drafter")  # idle in the long tail: train on the two responses

    def run() -> None:
        try:
            outcome.append(worker.run_rollout(queue, on_result, step_over))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        _eventually(lambda: pushes or outcome, "the drafter-role worker did not train")
        queue.extend([RolloutRequest(f"late{i}", [3, 4, 9 + i], params, 0) for i in range(2)])
        worker.wake()
        _eventually(lambda: len(answered) == 4 or outcome, "the requests were not answered while it trained")
        assert [role for _id, role in answered[2:]] == ["drafter", "drafter"]  # no role move needed
        trained = len(pushes)
        _eventually(lambda: len(pushes) > trained or outcome, "it did not go back to training once idle")
    finally:
        step_over.set()
        thread.join(WAIT_S)
        worker.set_role("rollout")
    assert not thread.is_alive() and len(outcome) == 1
    summary = outcome[0]
    assert not isinstance(summary, BaseException), summary
    assert sorted(r for r, _ in answered) == ["late0", "late1", "r0", "r1"]
    assert len(summary.drafter) >= 2 and summary.drafter[0].preempted  # the first stint stopped for the requests
    spans = [s.role for s in summary.spans]
    assert "rollout" in spans[spans.index("drafter"):]  # decoded after a stint
