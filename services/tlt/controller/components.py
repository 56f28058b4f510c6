"""Builds what one RL job needs from its spec: model files, tokenizer, prompts, reward, drafter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tlt.config import JobSpec
from tlt.data.datasets import PromptRecord, demo_prompts, load_prompts
from tlt.errors import ConfigError
from tlt.models.drafter import Eagle3Drafter
from tlt.models.transformer import CausalLM
from tlt.rewards.registry import reward_fn, reward_name_for_source

HELDOUT_SEED_OFFSET = 1_000_003


def resolve_model_dir(spec: JobSpec, build: bool = True) -> Path:
    """The policy's HF directory; ``demo`` builds (once, unless not ``build``) and returns the local demo model."""
    if spec.model.path == "demo":
        from tlt.models.demo import default_demo_dir, ensure_demo_model

        return Path(ensure_demo_model()) if build else default_demo_dir()
    path = Path(spec.model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a Hugging Face model directory (no config.json); "
                          "give a local directory or 'demo'")
    return path


@dataclass
class PromptSets:
    """Training prompts and the held-out set used to measure the policy."""

    train: list[PromptRecord]
    heldout: list[PromptRecord]


def load_prompt_sets(spec: JobSpec) -> PromptSets:
    """Demo prompts (train and held-out from disjoint seeds) or a dataset file with the last rows held out."""
    data = spec.data
    if data.source == "demo":
        need = max(spec.steps * data.prompts_per_step, 256)
        return PromptSets(demo_prompts(need, spec.seed), demo_prompts(data.heldout, spec.seed + HELDOUT_SEED_OFFSET)
                          if data.heldout else [])
    records = load_prompts(data.source)
    if len(records) <= data.heldout:
        raise ConfigError(f"data.heldout ({data.heldout}) leaves no training prompts in {data.source} "
                          f"({len(records)} rows); lower data.heldout")
    cut = len(records) - data.heldout
    return PromptSets(records[:cut], records[cut:])


def make_reward(spec: JobSpec) -> Callable[[PromptRecord, str], float]:
    """``reward(record, response_text)`` using the configured checker (``auto``: by data source)."""
    name = spec.data.reward

    def reward(record: PromptRecord, text: str) -> float:
        fn = reward_fn(name if name != "auto" else reward_name_for_source(record.data_source))
        return float(fn(text, record.ground_truth))

    return reward


class Tokenizer:
    """The model directory's tokenizer, reduced to what rollouts need."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def initial_drafter(spec: JobSpec, model_dir: Path, target: CausalLM) -> Eagle3Drafter:
    """The drafter the job starts from: the demo warm-up (cached), a random one, or an EAGLE-3 directory."""
    from tlt.drafter.warmup import ensure_demo_drafter, new_drafter
    from tlt.models.drafter_io import load_drafter

    init = spec.drafter.init
    if init == "random":
        return new_drafter(target, seed=spec.seed)
    if init == "demo":
        if spec.model.path != "demo":
            raise ConfigError("drafter.init: 'demo' only fits the demo model; give an EAGLE-3 directory "
                              "(e.g. from `tlt train-drafter --model ...`) or 'random'")
        return load_drafter(ensure_demo_drafter(model_dir), target).float()
    path = Path(init)
    if not (path / "config.json").is_file():
        raise ConfigError(f"drafter.init: {path} is not an EAGLE-3 directory; give a directory, 'demo' or 'random'")
    return load_drafter(path, target).float()


def set_threads(n: int) -> None:
    """Set torch's intra-op threads (never below one)."""
    torch.set_num_threads(max(1, n))
