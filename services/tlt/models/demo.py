"""Build small Qwen2-architecture models and a character-level tokenizer locally, with no download.

``build_random_model`` writes a Hugging Face model directory (config.json, generation_config.json,
model.safetensors, tokenizer files) that both transformers and our loader read, with random
weights (benchmarks and tests use it). ``ensure_demo_model`` builds the demo policy: the ``demo``
preset supervised-trained on the demo reasoning task (:mod:`tlt.data.demo_task`, training in
:mod:`tlt.models.demo_training`), with ``training_summary.json`` beside the weights.
"""

from __future__ import annotations

import json
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n"


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of a random Qwen2 model."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int | None = None  # None: the demo tokenizer's size
    max_position_embeddings: int = 2048


PRESETS: dict[str, ModelPreset] = {
    # The demo policy: small enough to train (~9 min) and RL-train on 2 CPU cores, deep enough that
    # it costs several times a one-layer drafter.
    "demo": ModelPreset(256, 6, 4, 2, 768, None, 2048),
    # Benchmark sizes (vocabulary as in real tokenizers so the LM head costs what it does in practice).
    "5m": ModelPreset(256, 4, 4, 2, 688, 8192, 2048),
    "25m": ModelPreset(512, 6, 8, 4, 1376, 16000, 2048),
    "100m": ModelPreset(768, 12, 12, 4, 2048, 32000, 2048),
}


def tlt_home() -> Path:
    """Where TLT caches built models and data (``$TLT_HOME``, default ``~/.cache/tlt``)."""
    return Path(os.environ.get("TLT_HOME", Path.home() / ".cache" / "tlt"))


def _byte_level_chars() -> dict[int, str]:
    """GPT-2/Qwen2 byte-level alphabet: byte value -> printable stand-in character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def demo_vocab() -> dict[str, int]:
    """Token string -> id for the demo tokenizer: special tokens, then one token per character."""
    stand_in = _byte_level_chars()
    tokens = list(SPECIAL_TOKENS) + [stand_in[ord(c)] for c in CHARSET]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(out_dir: Path):
    """Create and save the demo tokenizer; returns it.

    It is a byte-level BPE with no merges over a small character set, i.e. one token per
    character. Byte-level (as Qwen2 uses) matters: transformers and vLLM load a qwen2 model's
    tokenizer as ``Qwen2Tokenizer``, which re-imposes byte-level pre-tokenization.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab=demo_vocab(), merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def hf_config_dict(preset: ModelPreset, vocab_size: int, initializer_range: float = 0.02) -> dict:
    """A Qwen2 config.json dict for ``preset``."""
    from transformers import Qwen2Config

    vocab = demo_vocab()
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
    )
    raw = cfg.to_dict()
    raw["architectures"] = ["Qwen2ForCausalLM"]
    return raw


def build_random_model(out_dir: str | Path, preset: str | ModelPreset = "demo", seed: int = 0,
                       initializer_range: float = 0.02) -> Path:
    """Write a randomly initialised Qwen2 model plus the demo tokenizer to ``out_dir``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    vocab_size = spec.vocab_size or _round_up(len(tokenizer), 64)
    raw = hf_config_dict(spec, vocab_size, initializer_range)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config.from_dict(raw)).eval()
    model.save_pretrained(str(out))
    # save_pretrained rewrites config.json; keep ours (no transformers-version-specific fields lost).
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def default_demo_dir() -> Path:
    return tlt_home() / "models" / "demo"


def ensure_demo_model(out_dir: str | Path | None = None, *, steps: int | None = None, seed: int = 0,
                      eval_problems: int | None = None, progress: bool = True) -> Path:
    """Build the trained demo model once and reuse it (a finished build has ``.complete``).

    A build trains for ``steps`` (default ``$TLT_DEMO_TRAIN_STEPS``, else about 9 minutes on 2 CPU
    cores) and evaluates on ``eval_problems`` held-out problems (default ``$TLT_DEMO_EVAL_PROBLEMS``,
    else 200); see :func:`tlt.models.demo_training.build_trained_demo_model`. An existing finished
    build is returned as is, whatever these arguments say.
    """
    from tlt.fsutil import build_once
    from tlt.models.demo_training import build_trained_demo_model

    out = Path(out_dir) if out_dir else default_demo_dir()
    if progress and not (out / ".complete").exists():
        print(f"building the demo model in {out} (supervised training on the demo task)", file=sys.stderr)
    return build_once(out, lambda tmp: build_trained_demo_model(tmp, steps=steps, seed=seed,
                                                                eval_problems=eval_problems, progress=progress))


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
