"""Shared fixtures: small random Hugging Face models written to disk once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest_plugins = ["tests.integration.prometheus_fixtures"]

# Tests run on 2-core CI machines next to other processes; keep torch from oversubscribing.
torch.set_num_threads(2)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, max_position_embeddings=512)


def _save_random(path: Path, arch: str, init: float, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    kwargs = {**TINY, "initializer_range": init, "eos_token_id": 2, "bos_token_id": 1, **overrides}
    torch.manual_seed(1234)
    model = model_cls(cfg_cls(**kwargs)).eval()
    if arch == "qwen2":  # HF initialises q/k/v biases to zero; make them matter for parity
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, init)
    model.save_pretrained(str(path))
    return path


MODEL_VARIANTS = {
    # GQA 4/2, tied embeddings, q/k/v bias
    "qwen2-gqa-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    # GQA 4/1, untied, llama3 rope scaling
    "llama-gqa-rope3": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    # plain multi-head attention, explicit head_dim
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16)),
}


@pytest.fixture(scope="session", params=sorted(MODEL_VARIANTS))
def hf_model_dir(request, tmp_path_factory) -> Path:
    """Each architecture variant, with HF-default initialisation (std 0.02)."""
    arch, overrides = MODEL_VARIANTS[request.param]
    return _save_random(tmp_path_factory.mktemp(request.param), arch, 0.02, **overrides)


@pytest.fixture(scope="session")
def peaky_model_dir(tmp_path_factory) -> Path:
    """A Qwen2 GQA model with large init so greedy argmax has clear margins (no fp ties)."""
    return _save_random(tmp_path_factory.mktemp("peaky"), "qwen2", 0.2, num_attention_heads=4, num_key_value_heads=2)


def random_prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    """``count`` seeded prompts of 2-11 tokens drawn from ids ``3..vocab-1`` (clear of pad, bos and eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@pytest.fixture(scope="session")
def peaky_target(peaky_model_dir):
    """The peaky model loaded in fp32."""
    from tlt.models import load_model

    return load_model(peaky_model_dir, dtype="float32")


@pytest.fixture(scope="session")
def peaky_drafter(peaky_target):
    """A drafter briefly trained on the peaky target's own greedy continuations, so drafts get accepted."""
    from tlt.drafter.warmup import DrafterTrainConfig, Example, new_drafter, train_drafter
    from tlt.rollout.engine import RolloutEngine
    from tlt.rollout.sampling import SamplingParams

    prompts = random_prompts(peaky_target.config.vocab_size, 48, seed=11)
    outs = RolloutEngine(peaky_target).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=40,
                                                                        ignore_eos=True))
    d = new_drafter(peaky_target, seed=0)
    train_drafter(peaky_target, d, [Example(p, o.token_ids) for p, o in zip(prompts, outs)],
                  DrafterTrainConfig(steps=80, batch_size=12, lr=3e-3, warmup_steps=5))
    return d


# The demo model and drafter (built by the README's install step, cached under TLT_HOME).
@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from tlt.models.demo import ensure_demo_model

    return Path(ensure_demo_model())


@pytest.fixture(scope="session")
def demo_drafter_dir(demo_model_dir) -> Path:
    from tlt.drafter.warmup import ensure_demo_drafter

    return Path(ensure_demo_drafter(demo_model_dir))
