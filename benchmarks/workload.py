"""The long-tailed rollout workload the rollout benchmarks share (``speculative.py``, ``rollout_peers.py``).

Demo-task prompts (chain-of-thought lengths are heavy-tailed), sampled at ``temperature`` with one seed
per request, on the trained demo model and its warmed-up EAGLE-3 drafter (both built once and cached
under $TLT_HOME) unless other directories are given. The problems come from ``seed``, not the drafter's
warm-up seed, so the drafter has not seen them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Workload:
    """Prompts (token ids) and per-request sampling settings, with the model and drafter they run on.

    ``steps`` > 1 splits the prompts into that many rollout steps of equal size (as successive RL steps:
    new prompts each time)."""

    model_dir: Path
    drafter_dir: Path
    prompts: list[list[int]]
    temperature: float
    max_new_tokens: int
    seed: int
    steps: int = 1

    @property
    def batch_size(self) -> int:
        """Prompts per step."""
        return len(self.prompts) // self.steps

    def step(self, index: int) -> tuple[list[list[int]], list]:
        """Prompts and sampling settings of step ``index``."""
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.prompts[part], self.sampling_params()[part]

    def max_seq_len(self) -> int:
        """Prompt + completion room every engine gets (the longest prompt, all new tokens, a little slack)."""
        return max(len(p) for p in self.prompts) + self.max_new_tokens + 8

    def sampling_params(self) -> list:
        """Native :class:`~tlt.rollout.sampling.SamplingParams`, request ``i`` seeded with ``seed + i``."""
        from tlt.rollout.sampling import SamplingParams

        return [SamplingParams(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed + i)
                for i in range(len(self.prompts))]


def long_tail_workload(n_prompts: int, max_new_tokens: int, *, temperature: float = 1.0, seed: int = 1234,
                       model_dir: str | Path | None = None, drafter_dir: str | Path | None = None,
                       steps: int = 1) -> Workload:
    """The demo workload: ``steps`` x ``n_prompts`` problems from ``seed``, tokenized with the model's tokenizer."""
    from transformers import AutoTokenizer

    from tlt.data.demo_task import generate_problems
    from tlt.drafter.warmup import ensure_demo_drafter
    from tlt.models.demo import ensure_demo_model

    model_dir = Path(model_dir or ensure_demo_model())
    drafter_dir = Path(drafter_dir or ensure_demo_drafter(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in generate_problems(n_prompts * steps, seed)]
    return Workload(model_dir, drafter_dir, prompts, temperature, max_new_tokens, seed, steps)
