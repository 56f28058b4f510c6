"""GRPO math: group-normalised advantages, the clipped ratio loss, KL to a reference, aggregation.

Aggregation takes an explicit normaliser (tokens or sequences of the whole optimizer step), so summing
micro-batch losses under gradient accumulation gives exactly the loss of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tlt.errors import ConfigError

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO and optimizer settings (field names as in the job spec's ``trainer.grpo`` section)."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    norm_adv_by_std: bool = True
    loss_agg: LossAgg = "token-mean"
    ppo_epochs: int = 1
    mini_batch_size: int = 0
    micro_batch_tokens: int = 8192
    bf16_autocast: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, "lr must be > 0", self.lr),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)",
             self.betas),
            (self.weight_decay >= 0, "weight_decay must be >= 0", self.weight_decay),
            (self.grad_clip > 0, "grad_clip must be > 0", self.grad_clip),
            (0 < self.clip_ratio_low < 1, "clip_ratio_low must be in (0, 1)", self.clip_ratio_low),
            (self.clip_ratio_high > 0, "clip_ratio_high must be > 0", self.clip_ratio_high),
            (self.kl_coef >= 0, "kl_coef must be >= 0", self.kl_coef),
            (self.entropy_coef >= 0, "entropy_coef must be >= 0", self.entropy_coef),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1", self.ppo_epochs),
            (self.mini_batch_size >= 0, "mini_batch_size must be >= 0 (0 = the whole batch)", self.mini_batch_size),
            (self.micro_batch_tokens >= 16, "micro_batch_tokens must be >= 16", self.micro_batch_tokens),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ConfigError(f"{message}, got {value!r}")


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, norm_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean of its group) / (std of its group + eps)``; singleton or uniform groups give 0."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for g in groups.unique():
        idx = groups == g
        r = rewards[idx].float()
        if r.numel() < 2:
            continue
        centred = r - r.mean()
        out[idx] = centred / (r.std() + eps) if norm_by_std else centred
    return out


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: LossAgg, normaliser: float) -> torch.Tensor:
    """Sum of this micro-batch's share of the step loss; ``normaliser`` counts the step's tokens
    (``token-mean``) or sequences (the ``seq-mean-*`` modes)."""
    mask = mask.to(values.dtype)
    if agg == "token-mean":
        return (values * mask).sum() / normaliser
    per_seq = (values * mask).sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1).clamp_min(1)
    return per_seq.sum() / normaliser


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp`` (>= 0)."""
    d = (ref_logprobs - logprobs).clamp(-20, 20)
    return torch.exp(d) - d - 1


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float, clip_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped-ratio loss ``-min(r A, clip(r, 1-lo, 1+hi) A)`` and per-token diagnostics."""
    log_ratio = (logprobs - old_logprobs).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    info = {"clipped": (clipped < unclipped).float(), "approx_kl": 0.5 * log_ratio.pow(2), "ratio": ratio}
    return loss, {k: v.detach() for k, v in info.items()} | {"mask": mask}
