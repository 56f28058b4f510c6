"""Integration fixtures: the demo model and drafter (built by the README's install step, cached)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from tlt.models.demo import ensure_demo_model

    return Path(ensure_demo_model())


@pytest.fixture(scope="session")
def demo_drafter_dir(demo_model_dir) -> Path:
    from tlt.drafter.warmup import ensure_demo_drafter

    return Path(ensure_demo_drafter(demo_model_dir))


TINY_JOB = {
    "steps": 2, "data.prompts_per_step": 4, "data.group_size": 4, "data.heldout": 8, "data.eval_every": 0,
    "rollout.max_new_tokens": 96, "trainer.grpo.lr": 1e-4,
}
