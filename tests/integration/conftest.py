"""Integration settings: a tiny RL job on the demo model (fixtures for the model live in tests/conftest.py)."""

from __future__ import annotations

TINY_JOB = {
    "steps": 2, "data.prompts_per_step": 4, "data.group_size": 4, "data.heldout": 8, "data.eval_every": 0,
    "rollout.max_new_tokens": 96, "trainer.grpo.lr": 1e-4,
}
