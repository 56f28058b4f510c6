"""A few GRPO steps of the whole TLT loop improve the held-out reward of the demo policy."""

from __future__ import annotations

import json

import pytest

from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.models.demo_training import SUMMARY_FILE

# Four steps of 32 prompts x 8 samples improve a build that solves ~8% of held-out problems at T=1 (greedy
# 0.113 -> 0.141 in each of two runs). A build at 2.5% (one on a Xeon with AMX, 2026-11-28) gets ~6 rewarded
# samples a step: 4 steps left greedy 0.082 -> 0.059..0.078 and 12 steps on one-step problems left T=1
# 0.043 -> 0.044..0.045 on disjoint held-out prompts, so such a build cannot show a few-step gain.
MIN_SAMPLED_ACCURACY = 0.05


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
    if accuracy is not None and accuracy < MIN_SAMPLED_ACCURACY:
        pytest.skip(f"held-out reward {baseline:.3f} -> {final:.3f} not checked: this machine's demo build solves "
                    f"{accuracy:.1%} of held-out problems at T=1 (training_summary.json), below the "
                    f"{MIN_SAMPLED_ACCURACY:.0%} a few-step RL gain needs; builds vary by CPU")
    # Greedy evaluation: the rollouts' SD switches on by measured speed, so the sampled tokens (never their
    # distribution) vary from run to run, and one T=1 sample per prompt made the check flaky (0.035 -> 0.047
    # to 0.066 over runs). Greedy held-out reward measured 0.113 -> 0.141 in each of two runs.
    assert final >= baseline + 0.015, (baseline, final)
