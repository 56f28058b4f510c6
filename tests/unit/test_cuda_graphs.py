"""Static-shape graphs of the decode and verification forwards (tlt.rollout.cuda_graphs).

On CPU the static shapes run eagerly (nothing is captured): these tests check padding, buffers and
dispatch. The tests marked ``cuda`` capture real CUDA graphs and run only where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_prompts
from tests.unit.test_speculative import fixed_tuner
from tlt.errors import InvalidRequestError
from tlt.rollout.cuda_graphs import GraphedForward, capture_batch_sizes
from tlt.rollout.engine import RolloutEngine
from tlt.rollout.sampling import SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(("max_batch", "sizes"), [
    (1, [1]), (2, [1, 2]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 20]),
    (32, [1, 2, 4, 8, 16, 24, 32]),
])
def test_capture_batch_sizes(max_batch, sizes):
    assert capture_batch_sizes(max_batch) == sizes


def test_capture_batch_sizes_rejects_an_empty_range():
    with pytest.raises(ValueError, match="max_batch"):
        capture_batch_sizes(0)


def test_capture_needs_a_cuda_model(peaky_target):
    cache = peaky_target.new_cache(4, 64)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedForward(peaky_target, cache, (), 4, capture=True)


def _filled_cache(model, slots: int, length: int):
    cache = model.new_cache(slots, length)
    g = torch.Generator().manual_seed(0)
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape, generator=g))
    return cache


@pytest.mark.parametrize("width", [1, 5])
def test_padded_call_matches_eager_and_spares_live_slots(peaky_target, width):
    """3 rows pad to the batch-4 shape: their logits and hidden states equal the eager forward's, the padded
    row writes only its own (free) slot at positions 0..width-1, and slots past the shape are untouched."""
    model = peaky_target
    graphed_cache, eager_cache = _filled_cache(model, 8, 64), _filled_cache(model, 8, 64)
    graphed = GraphedForward(model, graphed_cache, (1, 2), 8, verify_widths=[5], max_verify_batch=8, capture=False)
    assert (4, width) in graphed.shapes
    depth = torch.tensor([0, 1, 1, 2, 2][:width])
    parents = torch.tensor([0, 0, 0, 1, 2][:width])
    mask = torch.eye(width, dtype=torch.bool)
    for node in range(1, width):
        mask[node] |= mask[parents[node]]

    def call(forward, cache, ids, cache_lens):
        block = mask.expand(len(ids), -1, -1) if width > 1 else None
        return forward(ids, cache_lens[:, None] + depth[None, :], cache=cache, cache_lens=cache_lens,
                       block_mask=block, hidden_layers=(1, 2))

    # A full batch-4 call first, so that the 3-row call must clear the stale fourth row.
    first = torch.randint(3, model.config.vocab_size, (4, width))
    call(graphed, graphed_cache, first, torch.full((4,), 40))
    call(model.forward, eager_cache, first, torch.full((4,), 40))
    before = [k.clone() for k in graphed_cache.keys]
    ids = torch.randint(3, model.config.vocab_size, (3, width))
    cache_lens = torch.tensor([10, 3, 17])
    got = call(graphed, graphed_cache, ids, cache_lens)
    want = call(model.forward, eager_cache, ids, cache_lens)
    assert graphed.graph_calls == 2 and graphed.eager_calls == 0
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for j in (1, 2):
        torch.testing.assert_close(got.hidden[j], want.hidden[j], rtol=1e-5, atol=1e-5)
    for layer, (k, k0) in enumerate(zip(graphed_cache.keys, before)):
        torch.testing.assert_close(k[:3], eager_cache.keys[layer][:3])  # the real rows wrote the same K
        assert torch.equal(k[3, :, width:], k0[3, :, width:]) and not torch.equal(k[3, :, :width], k0[3, :, :width])
        assert torch.equal(k[4:], k0[4:])


def test_calls_without_a_static_shape_run_eagerly(peaky_target):
    model = peaky_target
    cache = model.new_cache(4, 64)
    graphed = GraphedForward(model, cache, (), 2, capture=False)
    ids = torch.randint(3, model.config.vocab_size, (3, 1))
    lens = torch.zeros(3, dtype=torch.long)
    graphed(ids, cache=cache, cache_lens=lens)  # batch 3 > the largest decode shape (2)
    graphed(ids[:2], cache=cache, cache_lens=lens[:2], slot_offset=2)  # a slot offset (prefill of new rows)
    graphed(ids[:2], cache=cache, cache_lens=lens[:2], hidden_layers=(1,))  # other hidden layers
    graphed(torch.ones(2, 3, dtype=torch.long), cache=cache, cache_lens=lens[:2])  # a causal block (no tree)
    assert graphed.eager_calls == 4 and graphed.graph_calls == 0
    graphed(ids[:2], cache=cache, cache_lens=lens[:2])
    assert graphed.graph_calls == 1


def _engine_outputs(engine: RolloutEngine, prompts, params):
    return [o.token_ids for o in engine.generate(prompts, params)]


@pytest.mark.parametrize("strategy", [None, "3_1_4", "4_3_10"])
def test_engine_with_static_shapes_equals_eager_engine(peaky_target, peaky_drafter, strategy):
    """Greedy outputs through the static-shape path equal the eager engine's for ragged batches that pad,
    and every decode and verification goes through a static shape."""
    prompts = random_prompts(peaky_target.config.vocab_size, 11, seed=21)
    params = [SamplingParams(temperature=0.0, max_new_tokens=6 + 4 * i, ignore_eos=True) for i in range(11)]
    def engine(cuda_graphs):
        spec = {} if strategy is None else {"drafter": peaky_drafter, "tuner": fixed_tuner(strategy)}
        return RolloutEngine(peaky_target, max_running=7, cuda_graphs=cuda_graphs, **spec)

    eager, graphed = engine(False), engine(True)
    assert eager.graphs is None and graphed.graphs is not None
    assert _engine_outputs(graphed, prompts, params) == _engine_outputs(eager, prompts, params)
    assert graphed.graphs.graph_calls > 0 and graphed.graphs.eager_calls == 0
    if strategy is not None:
        assert graphed.stats.sd_iterations > 0 and graphed.stats.num_accepted_tokens > 0
        assert {w for _, w in graphed.graphs.shapes} == {1, int(strategy.split("_")[2])}


def test_cuda_graphs_default_off_on_cpu_and_exclusive_with_compile(peaky_target):
    assert RolloutEngine(peaky_target, max_running=2).graphs is None
    with pytest.raises(InvalidRequestError, match="compile and cuda_graphs"):
        RolloutEngine(peaky_target, max_running=2, compile=True, cuda_graphs=True)


@needs_cuda
@pytest.mark.parametrize("strategy", [None, "3_2_6"])
def test_cuda_graph_engine_equals_eager_engine_on_gpu(peaky_model_dir, strategy):
    """On a GPU the engine captures one graph per shape by default, replays them, and greedy outputs equal
    the eager engine's."""
    from tlt.drafter.warmup import new_drafter
    from tlt.models import load_model

    model = load_model(peaky_model_dir, dtype="float32", device="cuda")
    drafter = new_drafter(model, seed=0) if strategy else None
    prompts = random_prompts(model.config.vocab_size, 11, seed=21)
    params = [SamplingParams(temperature=0.0, max_new_tokens=6 + 4 * i, ignore_eos=True) for i in range(11)]

    def engine(cuda_graphs):
        spec = {"drafter": drafter, "tuner": fixed_tuner(strategy)} if strategy else {}
        return RolloutEngine(model, max_running=7, cuda_graphs=cuda_graphs, **spec)

    graphed = engine(None)
    assert graphed.graphs is not None and len(graphed.graphs.graphs()) == len(graphed.graphs.shapes)
    assert _engine_outputs(graphed, prompts, params) == _engine_outputs(engine(False), prompts, params)
    assert graphed.graphs.graph_calls > 0 and graphed.graphs.eager_calls == 0


@needs_cuda
def test_sampled_speculative_decoding_runs_on_gpu(peaky_model_dir):
    """Sampled rows take the verification path that draws with each request's uniforms (kept on the CPU)."""
    from tlt.drafter.warmup import new_drafter
    from tlt.models import load_model

    model = load_model(peaky_model_dir, dtype="float32", device="cuda")
    engine = RolloutEngine(model, max_running=4, drafter=new_drafter(model, seed=0), tuner=fixed_tuner("3_2_6"))
    prompts = random_prompts(model.config.vocab_size, 4, seed=22)
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=3))
    assert [len(o.token_ids) for o in outs] == [12] * 4 and engine.stats.sd_iterations > 0
