"""Drafter training settings, kept free of torch so the command line can show their defaults at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DrafterTrainConfig:
    """Optimisation settings for drafter training."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ttt_steps: int = 4
    ttt_decay: float = 0.8
    max_len: int = 512
    seed: int = 0
