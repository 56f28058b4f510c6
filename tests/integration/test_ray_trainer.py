"""Data-parallel GRPO on two persistent Ray Train workers matches one in-process worker."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_grpo import random_samples
from tlt.errors import ModelLoadError
from tlt.models.loader import load_model
from tlt.trainer.grpo import GRPOConfig
from tlt.trainer.policy import PolicyTrainer

ray = pytest.importorskip("ray")
from tlt.trainer.distributed import RayPolicyTrainer  # noqa: E402

pytestmark = pytest.mark.slow  # ~35 s on 2 cores, ~20 s of it starting Ray and the worker group

# Five groups of uneven length (unequal shards), mini-batches of 5 of 20 samples over two epochs: some
# updates leave a rank without samples, and each update's token normaliser spans both ranks.
CONFIG = GRPOConfig(lr=1e-4, bf16_autocast=False, mini_batch_size=5, ppo_epochs=2, micro_batch_tokens=64)
BATCHES = [random_samples(n_groups=5, seed=s) for s in (1, 2, 3)]
# The all-reduce sums gradients in another order than one worker: ~1e-10 of fp32 noise. Adam turns that
# into up to ~lr/30 per update where the true gradient is ~0 (elsewhere the weights agree to ~1e-7), so
# the tolerance is a tenth of one update's size; every weight moved by ~lr per update, 18 updates in all.
TOL = dict(rtol=0, atol=CONFIG.lr / 10)


@pytest.fixture(scope="module")
def ray_trainer(peaky_model_dir):
    starts_ray = not ray.is_initialized()
    trainer = RayPolicyTrainer(load_model(peaky_model_dir, dtype="float32"), CONFIG, num_workers=2)
    yield trainer
    trainer.close()
    assert ray.is_initialized() != starts_ray  # it shut down the runtime it started, and only that one


def _assert_weights_close(checkpoint, reference: PolicyTrainer) -> None:
    weights = load_file(str(checkpoint / "model.safetensors"))
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(weights[name], value, **TOL, msg=name)


def test_two_workers_match_one(ray_trainer, peaky_model_dir, tmp_path):
    single = PolicyTrainer(load_model(peaky_model_dir, dtype="float32"), CONFIG)
    for batch in BATCHES[:2]:
        expected, got = single.train_step(batch), ray_trainer.train_step(batch)
        for key in ("loss", "pg_loss", "entropy", "clip_fraction", "grad_norm", "reward_mean", "tokens"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert ray_trainer.step == single.step == 2 * 8  # 20 samples: 4 + 4 mini-batches per step
    _assert_weights_close(ray_trainer.save_checkpoint(tmp_path / "ray"), single)
    state, reference = ray_trainer.policy_state(), single.policy_state()
    assert state.keys() == reference.keys() and all(t.dtype == torch.bfloat16 for t in state.values())
    for name, value in reference.items():  # bf16 rounding of nearly equal fp32 weights: one ulp at most
        torch.testing.assert_close(state[name].float(), value.float(), rtol=1 / 128, atol=1e-6, msg=name)

    # checkpoints are interchangeable: continue both from the single worker's
    single.save_checkpoint(tmp_path / "single")
    ray_trainer.load_checkpoint(tmp_path / "single")
    assert ray_trainer.step == 16
    single.train_step(BATCHES[2])
    ray_trainer.train_step(BATCHES[2])
    _assert_weights_close(ray_trainer.save_checkpoint(tmp_path / "ray"), single)


def test_worker_errors_reach_the_caller_and_the_group_survives(ray_trainer, tmp_path):
    with pytest.raises(ModelLoadError, match="unreadable"):
        ray_trainer.load_checkpoint(tmp_path / "missing")
    step = ray_trainer.step
    metrics = ray_trainer.train_step([dataclasses.replace(s, reward=1.0) for s in BATCHES[0]])
    assert metrics["pg_loss"] == 0 and ray_trainer.step == step + metrics["updates"] == step + 8
