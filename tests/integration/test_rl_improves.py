"""A few GRPO steps of the whole TLT loop improve the held-out reward of a policy with room to improve.

Where a few-step gain is measurable depends on the policy. On the shipped demo build (60-70% of held-out
problems solved) the policy gradient of a step is mostly noise: gradients of independent 256-sample batches
have cosine -0.09..0.13 and agree in sign on 50% of the weights, and at lr 5e-5 real and shuffled advantages
lowered greedy held-out reward alike (0.631 -> 0.584 and 0.568, 800 prompts); at the default lr 1e-5 it held
(0.631 -> 0.624). A weak build (8% at T=1) went 0.113 -> 0.141 in 4 steps. So the gain is checked on the demo
policy weakened by seeded Gaussian noise on its matrices (0.6 x each matrix's std took greedy held-out reward
from 0.715 to 0.168): 4 steps of the default job raised it to 0.270 (lr 1e-5) and 0.277 (lr 5e-5), while the
same 4 steps with advantages of flipped sign lowered it to 0.078 (2026-11-29, 256 prompts) -- the reward
signal, not the noise fading, is what moves it. On the shipped build the same 4 steps kept greedy held-out
reward at 0.637 -> 0.637 (256 prompts; flipped advantages 0.637 -> 0.605, lr 5e-5 0.637 -> 0.621) and
0.812 -> 0.824 on another build; that check takes ~140 s more, so it runs only with ``TLT_LONG_TESTS=1`` (the
default suite must stay within its time budget).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tlt.config import apply_overrides, job_spec_from_dict
from tlt.controller.loop import Controller
from tlt.models.loader import read_safetensors

HELDOUT = 256
STEPS = 4
# Noise levels tried in turn until the weakened policy's greedy held-out reward falls in BASELINE_WINDOW (demo
# builds vary by CPU, so the first level may miss it on another machine).
NOISE_LEVELS = (0.6, 0.5, 0.7, 0.4, 0.8)
BASELINE_WINDOW = (0.08, 0.40)
MIN_GAIN = 0.05  # measured +0.10 and +0.11; flipped advantages -0.09
MAX_DROP = 0.02  # what the shipped build may lose in the same steps (measured 0.000 and +0.012)


def weakened_copy(model_dir: Path, out_dir: Path, noise: float, seed: int = 0) -> Path:
    """``model_dir`` with ``noise`` x each matrix's std of seeded Gaussian noise added to every 2-D weight but
    the token embedding (which the drafter shares)."""
    out_dir.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy(item, out_dir / item.name)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in read_safetensors(model_dir).items():
        if tensor.dim() == 2 and "embed" not in name:
            w = tensor.float()
            tensor = (w + noise * w.std() * torch.randn(w.shape, generator=generator)).to(tensor.dtype)
        weights[name] = tensor.contiguous()
    save_file(weights, str(out_dir / "model.safetensors"))
    return out_dir


def _controller(output_dir: Path, **overrides) -> Controller:
    return Controller(job_spec_from_dict(apply_overrides({}, {
        "steps": STEPS, "output_dir": str(output_dir), "data.eval_every": 0, "data.heldout": HELDOUT,
        "data.eval_temperature": 0.0, **overrides,
    })))


def _run_and_evaluate(controller: Controller) -> float:
    records = controller.run()
    assert all(r["sd"]["num_drafts"] > 0 for r in records)  # speculation ran in the tail
    assert sum(r["drafter_train"]["steps"] for r in records) > 0  # and so did online drafter training
    return controller.evaluate()


def test_rl_improves_the_heldout_reward_of_a_weakened_policy(tmp_path, demo_model_dir, demo_drafter_dir):
    tried = []
    for noise in NOISE_LEVELS:
        policy = weakened_copy(demo_model_dir, tmp_path / f"weak-{noise}", noise)
        controller = _controller(tmp_path / f"rl-{noise}", **{"model.path": str(policy),
                                                              "drafter.init": str(demo_drafter_dir)})
        baseline = controller.evaluate()
        tried.append((noise, baseline))
        if BASELINE_WINDOW[0] <= baseline <= BASELINE_WINDOW[1]:
            break
        controller.close()
    else:
        raise AssertionError(f"no noise level put the held-out reward in {BASELINE_WINDOW}: {tried}")
    final = _run_and_evaluate(controller)
    print(f"weakened policy (noise {noise}): held-out reward {baseline:.3f} -> {final:.3f}")
    assert final >= baseline + MIN_GAIN, (noise, baseline, final)


@pytest.mark.skipif(os.environ.get("TLT_LONG_TESTS") != "1", reason="~140 s; set TLT_LONG_TESTS=1 to run it")
def test_a_few_rl_steps_keep_a_strong_policy(tmp_path, demo_model_dir, demo_drafter_dir):
    controller = _controller(tmp_path / "rl")
    baseline = controller.evaluate()
    final = _run_and_evaluate(controller)
    print(f"demo policy: held-out reward {baseline:.3f} -> {final:.3f}")
    # an update that climbs the wrong way, or a learning rate too large for the build, loses more
    assert final >= baseline - MAX_DROP, (baseline, final)
