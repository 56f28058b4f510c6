"""The continuous-batching engine: exactness, batching invariance, sampling and stopping."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tlt.models import load_model
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)


def _prompts(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (count,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model(peaky_model_dir):
    return load_model(peaky_model_dir, dtype="float32")


def test_greedy_matches_transformers_generate_token_for_token(model, peaky_model_dir):
    ref = AutoModelForCausalLM.from_pretrained(str(peaky_model_dir), dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # compare free-running greedy paths (we ignore EOS here too)
    prompts = _prompts(model.config.vocab_size, 8)
    outputs = RolloutEngine(model, max_running=4, max_seq_len=128).generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        expected = ref.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=24,
        )[0, len(prompt):].tolist()
        assert out.token_ids == expected


def test_continuous_batching_equals_one_at_a_time(model):
    prompts = _prompts(model.config.vocab_size, 11, seed=1)
    # Mixed lengths so requests finish at different steps and slots are compacted mid-run.
    params = [SamplingParams(temperature=0.0, max_new_tokens=5 + 3 * i, ignore_eos=True) for i in range(11)]
    batched = RolloutEngine(model, max_running=4, max_prefill_tokens=30).generate(prompts, params)
    single = RolloutEngine(model, max_running=1).generate(prompts, params)
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    for a, b in zip(batched, single):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    prompts = _prompts(model.config.vocab_size, 6, seed=2)
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=30, max_new_tokens=20, seed=100 + i) for i in range(6)]
    first = RolloutEngine(model, max_running=6).generate(prompts, params)
    again = RolloutEngine(model, max_running=2).generate(prompts, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    reseeded = [SamplingParams(temperature=1.0, top_p=0.9, top_k=30, max_new_tokens=20, seed=7 + i) for i in range(6)]
    other = RolloutEngine(model, max_running=6).generate(prompts, reseeded)
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_engine_seed_makes_unseeded_requests_reproducible(model):
    prompts = _prompts(model.config.vocab_size, 3, seed=3)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    a = RolloutEngine(model, seed=5).generate(prompts, params)
    b = RolloutEngine(model, seed=5).generate(prompts, params)
    c = RolloutEngine(model, seed=6).generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompts = _prompts(model.config.vocab_size, 4, seed=4)
    greedy = RolloutEngine(model).generate(prompts, GREEDY)
    for params in (SamplingParams(temperature=0.8, top_k=1, max_new_tokens=24, ignore_eos=True, seed=1),
                   SamplingParams(temperature=0.8, top_p=1e-6, max_new_tokens=24, ignore_eos=True, seed=1)):
        assert [o.token_ids for o in RolloutEngine(model).generate(prompts, params)] == [o.token_ids for o in greedy]


def test_logprobs_are_those_of_the_model(model):
    prompt = _prompts(model.config.vocab_size, 1, seed=5)[0]
    params = SamplingParams(temperature=0.7, max_new_tokens=10, seed=3, ignore_eos=True)
    out = RolloutEngine(model).generate([prompt], params)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_sampling_follows_the_distribution(model):
    """First-token frequencies over many seeded draws match softmax(logits / T) (total variation)."""
    prompt = [5, 9, 14]
    params = [SamplingParams(temperature=1.5, max_new_tokens=1, seed=s, ignore_eos=True) for s in range(3000)]
    outs = RolloutEngine(model, max_running=64).generate([prompt] * len(params), params)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=model.config.vocab_size)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / 1.5, -1)
    tv = 0.5 * (counts / counts.sum() - probs).abs().sum().item()
    assert tv < 0.08


def test_stop_conditions(model):
    prompt = _prompts(model.config.vocab_size, 1, seed=6)[0]
    free = RolloutEngine(model).generate([prompt], GREEDY)[0].token_ids
    stop_at = free[5]
    first_hit = free.index(stop_at)
    # Stop token: output ends with it.
    out = RolloutEngine(model).generate([prompt], SamplingParams(temperature=0, max_new_tokens=24,
                                                                 stop_token_ids=(stop_at,), ignore_eos=True))[0]
    assert out.token_ids == free[: first_hit + 1] and out.finish_reason == "stop"
    # EOS from the engine, unless ignore_eos.
    eos = RolloutEngine(model, eos_token_ids=[stop_at]).generate([prompt], SamplingParams(temperature=0,
                                                                                          max_new_tokens=24))[0]
    assert eos.token_ids == free[: first_hit + 1] and eos.finish_reason == "stop"
    # max_new_tokens
    short = RolloutEngine(model).generate([prompt], SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True))
    assert short[0].token_ids == free[:3] and short[0].finish_reason == "length"
    # context limit
    ctx = RolloutEngine(model, max_seq_len=len(prompt) + 4).generate([prompt], GREEDY)[0]
    assert ctx.token_ids == free[:4] and ctx.finish_reason == "length"


def test_progress_snapshot_tracks_the_run(model):
    engine = RolloutEngine(model, max_running=2)
    prompts = _prompts(model.config.vocab_size, 5, seed=7)
    for p in prompts:
        engine.submit(p, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    before = engine.progress()
    assert (before.running, before.queued, before.finished) == (0, 5, 0)
    engine.step()
    mid = engine.progress()
    assert (mid.running, mid.queued, mid.finished, mid.generated_tokens) == (2, 3, 0, 2)
    seen = []
    engine.run(on_finish=lambda out: seen.append(engine.progress().finished))
    end = engine.progress()
    assert (end.running, end.queued, end.finished, end.generated_tokens) == (0, 0, 5, 30)
    assert end.tokens_per_s > 0 and len(seen) == 5
