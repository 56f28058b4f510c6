"""GRPO math and the policy trainer (tiny random model, fp32 for exactness)."""

import copy
import dataclasses

import pytest
import torch

from tlt.errors import ConfigError
from tlt.models.loader import load_model
from tlt.trainer.grpo import GRPOConfig, aggregate, group_advantages, kl_k3, policy_loss
from tlt.trainer.policy import PolicyTrainer, Sample, token_logprobs

EXACT = GRPOConfig(lr=1e-3, bf16_autocast=False)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = group_advantages(rewards, groups)
    r = rewards[:4]
    torch.testing.assert_close(adv[:4], (r - r.mean()) / (r.std() + 1e-6))
    assert adv[4:].abs().sum() == 0  # uniform group and singleton carry no signal
    torch.testing.assert_close(group_advantages(rewards, groups, norm_by_std=False)[:4], r - 0.25)


def test_clipping_both_sides():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    mask = torch.ones(1, 4, dtype=torch.bool)
    pos, info = policy_loss(logp, old, torch.ones(1, 4), mask, 0.2, 0.28)
    # A>0: ratio capped at 1.28 above, unclipped below
    torch.testing.assert_close(pos, -torch.tensor([[0.5, 0.9, 1.1, 1.28]]))
    assert info["clipped"].tolist() == [[0, 0, 0, 1]]
    neg, _ = policy_loss(logp, old, -torch.ones(1, 4), mask, 0.2, 0.28)
    # A<0: ratio floored at 0.8 (pessimistic max of -rA)
    torch.testing.assert_close(neg, torch.tensor([[0.8, 0.9, 1.1, 1.5]]))


def test_aggregations():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(values, mask, "token-mean", 4).item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-mean", 2).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum", 2).item() == pytest.approx((6 + 4) / 2)


def test_kl_k3():
    a = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert torch.all(kl_k3(a, a) == 0)
    assert torch.all(kl_k3(a, a.flip(0)) >= 0)


@pytest.mark.parametrize(("field", "value"), [("clip_ratio_low", 1.5), ("lr", 0.0), ("ppo_epochs", 0),
                                              ("micro_batch_tokens", 4), ("betas", (0.9, 1.0))])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(GRPOConfig(), **{field: value})


def _samples(vocab: int, n_groups: int = 3, per_group: int = 4, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for group in range(n_groups):
        prompt = torch.randint(3, vocab, (5,), generator=g).tolist()
        for k in range(per_group):
            length = 3 + int(torch.randint(0, 9, (1,), generator=g))
            out.append(Sample(prompt, torch.randint(3, vocab, (length,), generator=g).tolist(), float(k % 2), group))
    return out


@pytest.fixture(scope="module")
def model_dir(peaky_model_dir):
    return peaky_model_dir


def _mean_logp(model, samples, rewarded: bool) -> float:
    vals = []
    with torch.no_grad():
        for s in samples:
            if (s.reward > 0) != rewarded:
                continue
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            lp, _ = token_logprobs(model, ids, bf16=False)
            vals.append(lp[0, len(s.prompt_ids) - 1:].mean())
    return float(torch.stack(vals).mean())


def test_update_raises_logprob_of_rewarded_responses(model_dir):
    model = load_model(model_dir, dtype="float32")
    samples = _samples(model.config.vocab_size)
    good0, bad0 = _mean_logp(model, samples, True), _mean_logp(model, samples, False)
    trainer = PolicyTrainer(model, EXACT)
    for _ in range(3):
        metrics = trainer.train_step(samples)
    assert _mean_logp(model, samples, True) > good0 + 0.05
    assert _mean_logp(model, samples, False) < bad0 - 0.05
    assert trainer.step == 3 and metrics["reward_mean"] == 0.5


def test_gradient_accumulation_equals_one_big_batch(model_dir):
    samples = _samples(96)
    grads = []
    for budget in (100_000, 32):  # one micro-batch vs many
        trainer = PolicyTrainer(load_model(model_dir, dtype="float32"),
                                dataclasses.replace(EXACT, micro_batch_tokens=budget, grad_clip=1e9))
        trainer.optimizer.step = lambda: None  # keep the accumulated gradient for inspection
        trainer.train_step(samples)
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
    for a, b in zip(*grads):
        # fp32 summation order differs; a wrong normaliser would be off by O(|grad|)
        assert (a - b).norm() <= 1e-4 * a.norm() + 1e-9


def test_minibatches_and_epochs_make_more_updates(model_dir):
    model = load_model(model_dir, dtype="float32")
    cfg = dataclasses.replace(EXACT, mini_batch_size=4, ppo_epochs=2)
    metrics = PolicyTrainer(model, cfg).train_step(_samples(96))
    assert metrics["updates"] == 6


def test_kl_term_needs_reference_and_runs(model_dir):
    model = load_model(model_dir, dtype="float32")
    cfg = dataclasses.replace(EXACT, kl_coef=0.1)
    with pytest.raises(Exception, match="reference"):
        PolicyTrainer(model, cfg)
    trainer = PolicyTrainer(model, cfg, reference=copy.deepcopy(model))
    trainer.train_step(_samples(96))
    assert trainer.train_step(_samples(96))["kl"] > 0  # the policy moved away from the reference


def test_checkpoint_resume_is_bit_identical(model_dir, tmp_path):
    samples = _samples(96)
    a = PolicyTrainer(load_model(model_dir, dtype="float32"), EXACT)
    a.train_step(samples)
    a.save_checkpoint(tmp_path / "ckpt")
    a.train_step(samples)
    b = PolicyTrainer(load_model(model_dir, dtype="float32"), EXACT)
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.step == 1
    b.train_step(samples)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "trainer.json"}  # no pickle


def test_empty_batch_and_empty_response_refused(model_dir):
    trainer = PolicyTrainer(load_model(model_dir, dtype="float32"), EXACT)
    with pytest.raises(Exception, match="at least one sample"):
        trainer.train_step([])
    with pytest.raises(Exception, match="empty prompt or response"):
        trainer.train_step([Sample([5, 6], [], 1.0, 0)])
