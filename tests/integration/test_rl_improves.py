"""A few GRPO steps of the whole TLT loop improve the held-out reward of the demo policy."""

from __future__ import annotations

from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller


def test_rl_improves_heldout_reward(tmp_path, demo_drafter_dir):
    spec = job_spec_from_dict(apply_overrides({}, {
        "steps": 4, "output_dir": str(tmp_path / "rl"), "data.eval_every": 0, "data.heldout": 256,
        "data.eval_temperature": 0.0,
    }))
    controller = Controller(spec)
    baseline = controller.evaluate()
    records = controller.run()
    final = controller.evaluate()
    # Greedy evaluation: the rollouts' SD switches on by measured speed, so the sampled tokens (never their
    # distribution) vary from run to run, and one T=1 sample per prompt made the check flaky (0.035 -> 0.047
    # to 0.066 over runs). Greedy held-out reward measured 0.113 -> 0.141 in each of two runs.
    assert final >= baseline + 0.015, (baseline, final)
    assert all(r["sd"]["num_drafts"] > 0 for r in records)  # speculation ran in the tail
    assert sum(r["drafter_train"]["steps"] for r in records) > 0  # and so did online drafter training
