"""GRPO math and the policy trainer (tiny random model, fp32 without autocast for exactness)."""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from tlt.config import TrainerSpec
from tlt.errors import ConfigError, InvalidRequestError, ModelLoadError
from tlt.models.loader import load_model
from tlt.specparse import from_dict
from tlt.trainer.distributed import shard_by_group
from tlt.trainer.grpo import GRPOConfig, aggregate, group_advantages, kl_k3, policy_loss, step_normaliser
from tlt.trainer.policy import PolicyTrainer, Sample, pack, plan_updates, token_logprobs

EXACT = GRPOConfig(lr=1e-3, bf16_autocast=False)
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# ---- pure math ------------------------------------------------------------------------------

def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    adv = group_advantages(rewards, groups)
    r = rewards[:4]
    torch.testing.assert_close(adv[:4], (r - r.mean()) / (r.std() + 1e-6))
    assert torch.all(adv[4:] == 0)  # uniform group and singleton carry no signal, exactly
    torch.testing.assert_close(group_advantages(rewards, groups, norm_by_std=False)[:4], r - 0.25)
    # group ids need not be contiguous or sorted
    shuffled = group_advantages(torch.tensor([0.0, 2.0, 1.0, 3.0]), torch.tensor([7, -1, 7, -1]), False)
    torch.testing.assert_close(shuffled, torch.tensor([-0.5, -0.5, 0.5, 0.5]))


def test_clipping_both_sides_and_its_gradient():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[0.5, 0.9, 1.1, 1.5]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    for sign, expected, clipped_at in ((1, [0.5, 0.9, 1.1, 1.28], 3), (-1, [0.8, 0.9, 1.1, 1.5], 0)):
        logp = ratios.log().requires_grad_()
        loss, info = policy_loss(logp, old, sign * torch.ones(1, 4), mask, 0.2, 0.28)
        # A>0: ratio capped at 1 + 0.28; A<0: floored at 1 - 0.2 (the pessimistic bound)
        assert loss.item() == pytest.approx(-sign * sum(expected) / 4)
        assert info["clip_fraction"].item() == pytest.approx(0.25)
        assert info["ratio_mean"].item() == pytest.approx(ratios.mean().item())
        loss.backward()
        assert logp.grad[0, clipped_at] == 0 and torch.all(logp.grad[0, torch.arange(4) != clipped_at] != 0)


def test_policy_loss_is_zero_on_policy_with_zero_mean_advantages():
    logp = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, info = policy_loss(logp, logp, torch.tensor([[1.0], [-1.0]]).expand(2, 5), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(0.0) and info["approx_kl"].item() == 0 and info["clip_fraction"] == 0


@pytest.mark.parametrize(("agg", "expected"), [("token-mean", 10 / 4), ("seq-mean-token-mean", (2 + 4) / 2),
                                               ("seq-mean-token-sum", (6 + 4) / 2)])
def test_aggregations(agg, expected):
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    normaliser = step_normaliser([3, 1], agg)
    assert aggregate(values, mask, agg, normaliser).item() == pytest.approx(expected)
    assert aggregate(values, mask, agg).item() == pytest.approx(expected)  # None: this batch is the step
    # with the step's normaliser, per-micro-batch shares add up to the whole
    parts = aggregate(values[:1], mask[:1], agg, normaliser) + aggregate(values[1:], mask[1:], agg, normaliser)
    assert parts.item() == pytest.approx(expected)


def test_kl_k3():
    a = torch.log_softmax(torch.randn(64, 10), -1)
    b = torch.log_softmax(torch.randn(64, 10), -1)
    assert torch.all(kl_k3(a, a) == 0)
    assert torch.all(kl_k3(a, b) >= 0) and kl_k3(a, b).sum() > 0


@pytest.mark.parametrize(("field", "value"), [
    ("lr", 0.0), ("betas", (0.9, 1.0)), ("weight_decay", -1.0), ("grad_clip", 0.0), ("clip_ratio_low", 1.5),
    ("clip_ratio_high", 0.0), ("kl_coef", -0.1), ("entropy_coef", -0.1), ("loss_agg", "sum"), ("ppo_epochs", 0),
    ("mini_batch_size", -1), ("micro_batch_tokens", 4), ("seed", -1)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field} must"):
        dataclasses.replace(GRPOConfig(), **{field: value})


def test_config_errors_carry_the_job_spec_path():
    with pytest.raises(ConfigError, match=r"^trainer\.grpo\.clip_ratio_low must be in \(0, 1\), got 1\.5"):
        from_dict(TrainerSpec, {"grpo": {"clip_ratio_low": 1.5}}, "trainer")


# ---- batching -------------------------------------------------------------------------------

def random_samples(vocab: int = 96, n_groups: int = 3, per_group: int = 4, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for group in range(n_groups):
        prompt = torch.randint(3, vocab, (4 + group,), generator=g).tolist()
        for k in range(per_group):
            length = 3 + int(torch.randint(0, 9, (1,), generator=g))
            out.append(Sample(prompt, torch.randint(3, vocab, (length,), generator=g).tolist(), float(k % 2), group))
    return out


def _flat(lists: list[list[int]]) -> list[int]:
    return [i for part in lists for i in part]


def test_pack_masks_exactly_the_response_tokens():
    samples = random_samples()
    batches = pack(samples, range(len(samples)), token_budget=40)
    assert sorted(i for mb in batches for i in mb.rows) == list(range(len(samples)))
    for mb in batches:
        assert mb.ids.numel() <= 40 or len(mb.rows) == 1
        for row, i in enumerate(mb.rows):
            s = samples[i]
            targets = mb.ids[row, 1:][mb.mask[row]]
            assert targets.tolist() == s.response_ids
        values = torch.randn(mb.mask.shape)
        per_row = dict(zip(mb.rows, mb.split(values)))
        torch.testing.assert_close(mb.scatter(per_row), values * mb.mask)


def test_plan_updates_is_seeded_and_covers_every_sample_per_epoch():
    cfg = dataclasses.replace(EXACT, mini_batch_size=5, ppo_epochs=2)
    plan = plan_updates(12, cfg, step=3)
    assert [len(u) for u in plan] == [5, 5, 2, 5, 5, 2]
    assert sorted(_flat(plan[:3])) == sorted(_flat(plan[3:])) == list(range(12))
    assert plan == plan_updates(12, cfg, step=3) and plan != plan_updates(12, cfg, step=4)
    assert plan_updates(12, EXACT, step=0) == [list(range(12))]


def test_shard_by_group_keeps_groups_whole_and_balances_tokens():
    samples = random_samples(n_groups=5)
    shards = shard_by_group(samples, 2)
    assert sorted(_flat(shards)) == list(range(len(samples)))
    for shard in shards:
        groups = {samples[i].group for i in shard}
        assert all(samples[i].group not in groups for other in shards if other is not shard for i in other)
    assert shard_by_group(samples, 8)[7] == []  # more workers than groups: some idle


# ---- the trainer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(peaky_model_dir):
    return peaky_model_dir


def _trainer(model_dir, config=EXACT, reference=False) -> PolicyTrainer:
    model = load_model(model_dir, dtype="float32")
    return PolicyTrainer(model, config, copy.deepcopy(model) if reference else None)


def _response_logp(model, samples, rewarded: bool) -> float:
    vals = []
    with torch.no_grad():
        for s in samples:
            if (s.reward > 0) == rewarded:
                lp, _ = token_logprobs(model, torch.tensor([s.prompt_ids + s.response_ids]))
                vals.append(lp[0, len(s.prompt_ids) - 1:].mean())
    return float(torch.stack(vals).mean())


def test_update_raises_logprob_of_rewarded_responses(model_dir):
    trainer = _trainer(model_dir)
    samples = random_samples()
    good0, bad0 = _response_logp(trainer.model, samples, True), _response_logp(trainer.model, samples, False)
    for _ in range(2):
        metrics = trainer.train_step(samples)
    assert _response_logp(trainer.model, samples, True) > good0 + 0.05
    assert _response_logp(trainer.model, samples, False) < bad0 - 0.05
    assert trainer.step == 2 and metrics["reward_mean"] == 0.5 and metrics["updates"] == 1
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["clip_fraction"] == 0  # on-policy
    expected = {"loss", "pg_loss", "kl", "entropy", "clip_fraction", "grad_norm", "reward_mean", "reward_std",
                "response_len_mean", "tokens", "seconds", "lr"}
    assert expected <= set(metrics) and metrics["tokens"] == sum(len(s.response_ids) for s in samples)


def _record_gradients(trainer: PolicyTrainer) -> list[torch.Tensor]:
    """Make ``trainer`` keep a flat copy of the gradient of each optimizer update."""
    grads, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append(torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters()]))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return grads


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("updates", [1, 6])
def test_gradient_accumulation_equals_one_big_batch(model_dir, agg, updates):
    """Many micro-batches (and old log-probs recomputed in another layout) give the one-batch update.

    The gradients are the sharp check (a micro-batch-local normaliser would be off by O(1)). The weights are
    compared at lr 2e-6: Adam moves a weight by about lr * g / (|g| + 1e-8), so where the true gradient is ~0
    fp32 summation noise in g (~1e-10) alone moves it by up to ~lr / 30.
    """
    extra = {"mini_batch_size": 5, "ppo_epochs": 2} if updates > 1 else {}
    cfg = dataclasses.replace(EXACT, lr=2e-6, loss_agg=agg, **extra)
    weights, grads = [], []
    for budget in (100_000, 20):  # one micro-batch per update vs one row per micro-batch
        trainer = _trainer(model_dir, dataclasses.replace(cfg, micro_batch_tokens=budget))
        grads.append(_record_gradients(trainer))
        assert trainer.train_step(random_samples())["updates"] == updates
        weights.append(trainer.model.state_dict())
    for one, many in zip(*grads):
        assert (one - many).norm() <= 1e-5 * one.norm()
    for name, a in weights[0].items():
        assert (a - weights[1][name]).abs().max() <= 1e-6, name


def test_same_seed_same_samples_same_weights(model_dir):
    cfg = dataclasses.replace(EXACT, mini_batch_size=5)
    a, b = _trainer(model_dir, cfg), _trainer(model_dir, cfg)
    for trainer in (a, b):
        trainer.train_step(random_samples())
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_kl_term_needs_reference_and_runs(model_dir):
    cfg = dataclasses.replace(EXACT, kl_coef=0.1)
    with pytest.raises(ConfigError, match="reference"):
        _trainer(model_dir, cfg)
    trainer = _trainer(model_dir, cfg, reference=True)
    assert trainer.train_step(random_samples())["kl"] == 0  # the policy starts at the reference
    assert trainer.train_step(random_samples())["kl"] > 0  # and moved away from it


def test_entropy_bonus_raises_entropy(model_dir):
    samples = [dataclasses.replace(s, reward=1.0) for s in random_samples()]  # no advantage: only the bonus acts
    trainer = _trainer(model_dir, dataclasses.replace(EXACT, entropy_coef=1.0))
    first = trainer.train_step(samples)
    assert first["pg_loss"] == 0 and trainer.train_step(samples)["entropy"] > first["entropy"]


def test_checkpoint_resume_is_bit_identical_and_pickle_free(model_dir, tmp_path):
    cfg = dataclasses.replace(EXACT, mini_batch_size=5)  # the shuffle must resume too
    a = _trainer(model_dir, cfg)
    a.train_step(random_samples(seed=1))
    a.save_checkpoint(tmp_path / "ckpt")
    a.save_checkpoint(tmp_path / "ckpt")  # replacing an existing checkpoint
    after = a.train_step(random_samples(seed=2))
    b = _trainer(model_dir, cfg)
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.step == 3  # optimizer updates: 12 samples in mini-batches of 5
    resumed = b.train_step(random_samples(seed=2))
    assert resumed["loss"] == after["loss"] and resumed["grad_norm"] == after["grad_norm"]
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old copies left
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "trainer.json"]
    for path in (tmp_path / "ckpt").iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # no pickle stream
    optimizer = load_file(str(tmp_path / "ckpt" / "optimizer.safetensors"))
    assert optimizer["embed:step"].shape == () and "embed:exp_avg_sq" in optimizer


def test_bad_checkpoints_are_refused(model_dir, tmp_path):
    trainer = _trainer(model_dir)
    with pytest.raises(ModelLoadError, match="unreadable"):
        trainer.load_checkpoint(tmp_path / "missing")
    trainer.save_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="unreadable"):
        trainer.load_checkpoint(tmp_path / "ckpt")


def test_policy_state_is_a_bf16_hf_copy(model_dir):
    trainer = _trainer(model_dir)
    state = trainer.policy_state()
    assert "model.embed_tokens.weight" in state and "model.layers.0.self_attn.q_proj.weight" in state
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    before = state["model.norm.weight"].clone()
    trainer.train_step(random_samples())
    assert torch.equal(state["model.norm.weight"], before)  # not a view of the live weights


def test_invalid_samples_are_refused(model_dir):
    trainer = _trainer(model_dir)
    with pytest.raises(InvalidRequestError, match="at least one sample"):
        trainer.train_step([])
    with pytest.raises(InvalidRequestError, match="empty prompt or response"):
        trainer.train_step([Sample([5, 6], [], 1.0, 0)])
    with pytest.raises(InvalidRequestError, match=r"sample 1 has token ids outside .* \[0, 96\)"):
        trainer.train_step([Sample([5, 6], [7], 1.0, 0), Sample([5, 6], [96], 0.0, 0)])
    with pytest.raises(InvalidRequestError, match="513 tokens, more than the model's 512 positions"):
        trainer.train_step([Sample([5] * 500, [7] * 13, 1.0, 0)])
    assert trainer.step == 0
