"""Speculative decoding is lossless: greedy outputs are identical, sampled outputs keep the distribution."""

from __future__ import annotations

import math

import pytest
import torch

import tlt.rollout.speculative as speculative
from tests.conftest import random_prompts as _prompts
from tlt.drafter.warmup import DrafterTrainConfig, Example, new_drafter, train_drafter
from tlt.models import load_model
from tlt.models.drafter_io import load_drafter, save_drafter
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.sampling import SamplingParams, sample_from_probs
from tlt.rollout.tuner import BegMabTuner, SpecStrategy, TunerConfig

STRATEGIES = ["1_1_2", "3_1_4", "3_2_6", "4_3_10"]


def fixed_tuner(name: str) -> BegMabTuner:
    """Speculate at every batch size with exactly one strategy."""
    return BegMabTuner(TunerConfig(sd_batch_threshold=1024, strategies=[SpecStrategy.parse(name)], epsilon=0.0,
                                   allow_sd_off_arm=False))


@pytest.fixture(scope="module")
def target(peaky_target):
    return peaky_target


@pytest.fixture(scope="module")
def drafter(peaky_drafter):
    return peaky_drafter


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_speculative_equals_plain_greedy(target, drafter, strategy):
    prompts = _prompts(target.config.vocab_size, 10, seed=3)
    params = [SamplingParams(temperature=0.0, max_new_tokens=20 + 3 * i, ignore_eos=True) for i in range(10)]
    plain = RolloutEngine(target, max_running=4).generate(prompts, params)
    engine = RolloutEngine(target, max_running=4, drafter=drafter, tuner=fixed_tuner(strategy))
    spec = engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    for a, b in zip(spec, plain):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert engine.stats.sd_iterations > 0 and engine.stats.num_accepted_tokens > 0
    assert engine.stats.acceptance_length > 1.0


@pytest.mark.parametrize("strategy", ["3_1_4", "4_3_10"])
def test_seeded_sampling_is_identical_with_and_without_speculation(target, drafter, strategy):
    prompts = _prompts(target.config.vocab_size, 8, seed=4)
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=24, seed=50 + i,
                             ignore_eos=True) for i in range(8)]
    plain = RolloutEngine(target, max_running=4).generate(prompts, params)
    engine = RolloutEngine(target, max_running=4, drafter=drafter, tuner=fixed_tuner(strategy))
    spec = engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert engine.stats.num_accepted_tokens > 0


def test_adaptive_switches_on_in_the_tail_and_stays_lossless(target, drafter):
    """Threshold 2: a batch of 6 decodes plainly, the last two long requests speculate."""
    prompts = _prompts(target.config.vocab_size, 6, seed=8)
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in (4, 6, 8, 10, 40, 48)]
    plain = RolloutEngine(target, max_running=6).generate(prompts, params)
    tuner = BegMabTuner(TunerConfig(sd_batch_threshold=2, strategies=["3_1_4", "3_2_6"], epsilon=0.0))
    engine = RolloutEngine(target, max_running=6, drafter=drafter, tuner=tuner)
    assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in plain]
    assert engine.stats.plain_iterations > 0 and engine.stats.sd_iterations > 0
    for bucket, info in tuner.summary().items():  # only tail buckets ever speculated
        if int(bucket) > 2:
            assert set(info["pulls"]) <= {"off"}
    state = tuner.export_state()
    warm = BegMabTuner.from_state(tuner.config, state)
    assert warm.export_state() == state


def test_greedy_with_stop_tokens_and_length_limits(target, drafter):
    prompts = _prompts(target.config.vocab_size, 6, seed=5)
    plain_free = RolloutEngine(target).generate(prompts, SamplingParams(temperature=0, max_new_tokens=30,
                                                                        ignore_eos=True))
    stop = plain_free[0].token_ids[7]
    params = SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=(stop,), ignore_eos=True)
    plain = RolloutEngine(target, max_seq_len=28).generate(prompts, params)
    spec = RolloutEngine(target, max_seq_len=28, drafter=drafter, tuner=fixed_tuner("4_3_10")).generate(prompts,
                                                                                                       params)
    assert [(o.token_ids, o.finish_reason) for o in spec] == [(o.token_ids, o.finish_reason) for o in plain]


def _joint_counts(engine: RolloutEngine, prompt: list[int], draws: int, vocab: int) -> torch.Tensor:
    params = [SamplingParams(temperature=1.0, max_new_tokens=2, ignore_eos=True, seed=s) for s in range(draws)]
    outs = engine.generate([prompt] * draws, params)
    counts = torch.zeros(vocab * vocab)
    for o in outs:
        counts[o.token_ids[0] * vocab + o.token_ids[1]] += 1
    return counts


def _exact_joint(target, prompt: list[int]) -> torch.Tensor:
    vocab = target.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].double(), -1)
        seqs = torch.tensor([[*prompt, t] for t in range(vocab)])
        p2 = torch.softmax(target(seqs).logits[:, -1].double(), -1)
    return (p1[:, None] * p2).reshape(-1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson statistic with cells of small expectation pooled; returns (statistic, degrees of freedom)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.fixture(scope="module")
def small_vocab_setup(tmp_path_factory):
    """A 12-token target and a drafter trained on its samples: drafts are plausible but imperfect."""
    from tests.conftest import _save_random

    path = _save_random(tmp_path_factory.mktemp("tiny-vocab"), "qwen2", 0.3, vocab_size=12,
                        num_attention_heads=4, num_key_value_heads=2)
    tgt = load_model(path, dtype="float32")
    prompts = _prompts(12, 32, seed=21)
    outs = RolloutEngine(tgt).generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=24, seed=1,
                                                               ignore_eos=True))
    d = new_drafter(tgt, seed=1)
    train_drafter(tgt, d, [Example(p, o.token_ids) for p, o in zip(prompts, outs)],
                  DrafterTrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=5))
    return tgt, d


DRAWS = 2000
PROMPT = [3, 7, 1, 5]


def test_sampled_speculative_matches_target_distribution(small_vocab_setup):
    tgt, d = small_vocab_setup
    engine = RolloutEngine(tgt, max_running=64, drafter=d, tuner=fixed_tuner("3_2_6"))
    counts = _joint_counts(engine, PROMPT, DRAWS, 12)
    stat, dof = chi_square(counts, _exact_joint(tgt, PROMPT))
    assert engine.stats.sd_iterations > 0 and engine.stats.num_accepted_tokens > 0
    print(f"speculative: chi2={stat:.1f} dof={dof} critical={chi_square_critical(dof):.1f}")
    assert stat < chi_square_critical(dof), f"chi2={stat:.1f} dof={dof}"


def test_plain_sampling_passes_the_same_check(small_vocab_setup):
    tgt, _ = small_vocab_setup
    counts = _joint_counts(RolloutEngine(tgt, max_running=64), PROMPT, DRAWS, 12)
    stat, dof = chi_square(counts, _exact_joint(tgt, PROMPT))
    assert stat < chi_square_critical(dof)


def _bonus_from_p(probs, drawn):
    """The classic bug: after rejecting every child, draw the bonus afresh from p, not the residual."""
    return sample_from_probs(probs, torch.rand(probs.shape[0]))


def test_broken_acceptance_rule_is_detected(small_vocab_setup, monkeypatch):
    """Negative control: the same check catches a bonus token drawn from p instead of the residual."""
    tgt, d = small_vocab_setup
    monkeypatch.setattr(speculative, "residual_tokens", _bonus_from_p)
    engine = RolloutEngine(tgt, max_running=64, drafter=d, tuner=fixed_tuner("3_2_6"))
    counts = _joint_counts(engine, PROMPT, DRAWS, 12)
    stat, dof = chi_square(counts, _exact_joint(tgt, PROMPT))
    print(f"broken: chi2={stat:.1f} dof={dof} critical={chi_square_critical(dof):.1f}")
    assert stat > chi_square_critical(dof), f"broken rule went unnoticed: chi2={stat:.1f} dof={dof}"


def test_drafter_checkpoint_roundtrip(target, drafter, tmp_path):
    path = save_drafter(drafter, tmp_path / "eagle3", dtype=torch.float32)
    import json

    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(drafter.config.aux_layer_ids)
    again = load_drafter(path, target)
    for (name, a), (_, b) in zip(drafter.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(a.float(), b.float(), msg=name)
    assert torch.equal(again.d2t, drafter.d2t) and torch.equal(again.t2d, drafter.t2d)


def test_compiled_engine_is_lossless_and_compiles_only_in_its_warm_up(target, drafter):
    """torch.compile'd decode, verification and drafter forwards: the same greedy tokens as eager plain
    decoding, with adaptive SD on in the tail; warm_up compiles every graph, none past dynamo's recompile
    limit (which would run that forward eagerly), and leaves the bandit untouched."""
    from torch._dynamo.utils import counters

    prompts = _prompts(target.config.vocab_size, 6, seed=9)
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in (4, 6, 9, 12, 30, 36)]
    plain = RolloutEngine(target, max_running=6).generate(prompts, params)
    tuner = BegMabTuner(TunerConfig(sd_batch_threshold=2, strategies=["3_1_4", "3_2_6"], epsilon=0.0))
    engine = RolloutEngine(target, max_running=6, drafter=drafter, tuner=tuner, compile=True)
    before = tuner.export_state()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # no forward falls back to eager
        engine.warm_up(prompts[0])
        assert tuner.export_state() == before and engine.stats.sd_iterations == 0 and engine.progress().finished == 0
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        assert [o.token_ids for o in engine.generate(prompts, params)] == [o.token_ids for o in plain]
    assert engine.stats.plain_iterations > 0 and engine.stats.sd_iterations > 0
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled mid-rollout


def test_compiled_drafter_warm_up_covers_one_token_catch_ups(target, drafter):
    """A good drafter may have nothing rejected during warm_up's short generations, so generation alone never
    runs a one-token catch-up; warm_up still compiles the drafter for it (one row and several, any start)."""
    from torch._dynamo.utils import counters

    from tlt.rollout.speculative import _last_query_mask

    engine = RolloutEngine(target, max_running=4, drafter=drafter,
                           tuner=BegMabTuner(TunerConfig(strategies=["3_1_4"])), compile=True)
    engine.warm_up(_prompts(target.config.vocab_size, 1, seed=3)[0])
    graphs = counters["stats"]["unique_graphs"]
    spec = engine.spec
    width = len(spec.aux_layers) * drafter.config.target_hidden_size
    with torch.inference_mode():
        for rows, tokens, start in ((1, 1, 5), (3, 1, 7), (1, 3, 0), (2, 1, 0)):
            starts = torch.full((rows,), start)
            cols = starts[:, None] + torch.arange(tokens)[None, :]
            feats = torch.randn(rows, tokens, width).to(drafter.fc.dtype)
            ids = torch.ones(rows, tokens, dtype=torch.long)
            last = torch.full((rows,), tokens - 1)
            spec._drafter_catch_up(ids, drafter.fuse(feats), cols, spec.drafter_cache, 0, cols, start + tokens,
                                   _last_query_mask(starts + last, start + tokens), last)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_tree_expansion_is_warmed_up_for_any_row_count(target, drafter):
    """The compiled tree expansion (drafter steps + tree bookkeeping, one graph per strategy) is compiled by
    warm_up's generations at one and two rows for every strategy, also for the row counts and cache lengths
    (three rows, where a top-k of 2 no longer equals the row count) a rollout reaches later."""
    from torch._dynamo.utils import counters

    strategies = ["3_1_4", "3_2_6"]
    engine = RolloutEngine(target, max_running=4, drafter=drafter,
                           tuner=BegMabTuner(TunerConfig(strategies=strategies)), compile=True)
    engine.warm_up(_prompts(target.config.vocab_size, 1, seed=3)[0])
    graphs = counters["stats"]["unique_graphs"]
    spec = engine.spec
    hidden, vocab = drafter.config.attn.hidden_size, drafter.config.draft_vocab_size
    with torch.inference_mode(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for name in strategies:
            strategy = SpecStrategy.parse(name)
            for rows, base in ((1, 5), (3, 9), (4, 40), (2, 17)):
                cache_lens = torch.arange(rows) + base
                tokens, parents, depth, mask, closed = spec._draft_tree(
                    torch.randn(rows, hidden).to(drafter.fc.dtype), torch.randn(rows, vocab), cache_lens,
                    torch.ones(rows, dtype=torch.long), spec.drafter_cache,
                    base + rows - 1, strategy.topk, strategy.depth, strategy.num_verify)
                n = strategy.num_verify
                assert bool(closed) and tokens.shape == parents.shape == (rows, n) and mask.shape == (rows, n, n)
                assert int(depth.max()) <= strategy.depth
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_engine_makes_room_for_a_tree_graph_per_strategy_and_row_class(target, drafter):
    """Two tree-expansion graphs per strategy (one row, more): with five strategies that passes dynamo's default
    limit of 8 graphs per function, past which it would run the expansion eagerly; the engine raises the limit
    (compiling ten graphs to watch it would take minutes of a cold CI run, so this reads the setting)."""
    strategies = ["2_1_2", "2_2_3", "2_2_4", "2_3_4", "2_4_5"]
    with torch._dynamo.config.patch(recompile_limit=8):
        RolloutEngine(target, max_running=4, drafter=drafter, compile=False,
                      tuner=BegMabTuner(TunerConfig(strategies=strategies)))
        assert torch._dynamo.config.recompile_limit == 8  # eager engines leave it alone
        RolloutEngine(target, max_running=4, drafter=drafter, compile=True,
                      tuner=BegMabTuner(TunerConfig(strategies=strategies)))
        assert torch._dynamo.config.recompile_limit == 10
        RolloutEngine(target, max_running=4, drafter=drafter, compile=True,
                      tuner=BegMabTuner(TunerConfig(strategies=strategies[:2])))
        assert torch._dynamo.config.recompile_limit == 10  # never lowered


def test_catch_up_forward_at_the_last_token_equals_the_full_forward(drafter):
    """A catch-up computes attention, MLP and head only at each row's last token: its outputs and the K/V it
    writes equal those of the full forward over every token."""
    from tlt.models.transformer import _attention_mask
    from tlt.rollout.speculative import _last_query_mask

    g = torch.Generator().manual_seed(5)
    starts, counts, width = torch.tensor([0, 4, 9]), torch.tensor([6, 1, 3]), 6
    cols = starts[:, None] + torch.arange(width)[None, :]
    key_len = int(starts.max()) + width
    feats = torch.randn(3, width, 3 * drafter.config.target_hidden_size, generator=g)
    ids = torch.randint(3, drafter.config.target_vocab_size, (3, width), generator=g)
    caches = [drafter.new_cache(3, 32) for _ in range(2)]
    for cache in caches:  # the same earlier context in both
        cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=torch.Generator().manual_seed(1)))
        cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=torch.Generator().manual_seed(2)))
    last = counts - 1
    with torch.inference_mode():
        hidden = drafter.fuse(feats)
        full = drafter.forward_cached(ids, hidden, cols, caches[0], 0, cols, key_len,
                                      _attention_mask(starts, width, key_len, None))
        one = drafter.forward_cached_last(ids, hidden, cols, caches[1], 0, cols, key_len,
                                          _last_query_mask(starts + last, key_len), last)
    rows = torch.arange(3)
    assert one.logits.shape[:2] == (3, 1)
    torch.testing.assert_close(one.logits[:, 0], full.logits[rows, last], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.hidden[:, 0], full.hidden[rows, last], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0].keys[0], caches[1].keys[0]) and torch.equal(caches[0].values[0], caches[1].values[0])
