"""A few GRPO steps of the whole TLT loop improve the held-out reward of a weak demo policy and keep a strong one."""

from __future__ import annotations

import json

import pytest

from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.models.demo_training import SUMMARY_FILE

# Where a few-step gain is measurable depends on the build. Four steps of 32 prompts x 8 samples improved a
# build that solved ~8% of held-out problems at T=1 (greedy 0.113 -> 0.141 in each of two runs, lr 5e-5). A
# build at 2.5% gets ~6 rewarded samples a step: 4 steps left greedy 0.082 -> 0.059..0.078. On the shipped
# 60% build the policy gradient of a step is mostly noise: gradients of independent 256-sample batches have
# cosine -0.09..0.13 and agree in sign on 50% of the weights, and at lr 5e-5 real and shuffled advantages
# lowered greedy held-out reward alike (0.631 -> 0.584 and 0.568, 800 prompts); at the default lr 1e-5 it
# held (0.631 -> 0.624), and 30 steps on 2-5-step problems moved it by at most +0.02 at T=1. So the gain is
# checked only in the window where it was measured, and outside it the run must not damage the policy.
MIN_SAMPLED_ACCURACY = 0.05
MAX_SAMPLED_ACCURACY = 0.30
# 256 greedy prompts, 4 steps: the default lr kept 0.637 -> 0.637, advantages of flipped sign fell 0.637 -> 0.605 and
# lr 5e-5 0.637 -> 0.621.
MAX_DROP = 0.02


def _sampled_accuracy(model_dir) -> float | None:
    summary = json.loads((model_dir / SUMMARY_FILE).read_text())
    return summary.get("eval", {}).get("sampled_accuracy_t1")


def test_rl_improves_heldout_reward(tmp_path, demo_model_dir, demo_drafter_dir):
    spec = job_spec_from_dict(apply_overrides({}, {
        "steps": 4, "output_dir": str(tmp_path / "rl"), "data.eval_every": 0, "data.heldout": 256,
        "data.eval_temperature": 0.0,
    }))
    controller = Controller(spec)
    baseline = controller.evaluate()
    records = controller.run()
    final = controller.evaluate()
    assert all(r["sd"]["num_drafts"] > 0 for r in records)  # speculation ran in the tail
    assert sum(r["drafter_train"]["steps"] for r in records) > 0  # and so did online drafter training
    accuracy = _sampled_accuracy(demo_model_dir)
    if accuracy is not None and accuracy > MAX_SAMPLED_ACCURACY:
        # A strong build: a few steps cannot show a gain (see above), but they must not harm it as an update
        # that climbs the wrong way does.
        assert final >= baseline - MAX_DROP, (baseline, final)
        pytest.skip(f"held-out reward {baseline:.3f} -> {final:.3f} (kept within {MAX_DROP}); the gain is not "
                    f"checked: this machine's demo build solves {accuracy:.1%} of held-out problems at T=1, "
                    f"above the {MAX_SAMPLED_ACCURACY:.0%} where a few-step gain was measured")
    if accuracy is not None and accuracy < MIN_SAMPLED_ACCURACY:
        pytest.skip(f"held-out reward {baseline:.3f} -> {final:.3f} not checked: this machine's demo build solves "
                    f"{accuracy:.1%} of held-out problems at T=1 (training_summary.json), below the "
                    f"{MIN_SAMPLED_ACCURACY:.0%} a few-step RL gain needs; builds vary by CPU")
    # Greedy evaluation: the rollouts' SD switches on by measured speed, so the sampled tokens (never their
    # distribution) vary from run to run, and one T=1 sample per prompt made the check flaky (0.035 -> 0.047
    # to 0.066 over runs). Greedy held-out reward measured 0.113 -> 0.141 in each of two runs.
    assert final >= baseline + 0.015, (baseline, final)
