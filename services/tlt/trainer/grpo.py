"""GRPO math: group-normalised advantages, the clipped ratio loss, KL to a reference, aggregation.

Pure tensor functions, no model code. Every aggregation takes an explicit ``normaliser``: the number of
response tokens (``token-mean``) or of sequences (``seq-mean-*``) of the *whole optimizer step*, not of the
micro-batch at hand. A micro-batch's loss is then its share of the step loss, so summing micro-batch losses
(gradient accumulation, or an all-reduce across data-parallel workers) gives exactly the loss of one big
batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from tlt.errors import ConfigError

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
LOSS_AGGS: tuple[str, ...] = get_args(LossAgg)


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO and optimizer settings (the job spec's ``trainer.grpo`` section).

    ``clip_ratio_low``/``clip_ratio_high`` bound the importance ratio to ``[1 - low, 1 + high]`` (the
    asymmetric "clip-higher" of DAPO). ``mini_batch_size`` is the number of samples per optimizer update
    (0: the whole batch is one update); ``micro_batch_tokens`` is the padded-token budget of one
    forward/backward, gradients of the micro-batches are accumulated. A single sample longer than the
    budget gets a micro-batch of its own.

    The defaults are the job's (``tlt run``, RLJob), tuned for the small demo model: two updates per step
    of 256 samples; real models want lr around 1e-6.
    """

    # 5e-5 improved a weak (8%) demo build in 4 steps but lowers the 60% build's held-out reward (0.63 ->
    # 0.58, as much as shuffled advantages do: its policy gradient is mostly noise at 256 samples a step);
    # 1e-5 keeps it (0.63 -> 0.62).
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
    mini_batch_size: int = 128
    micro_batch_tokens: int = 4096
    bf16_autocast: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field (``clip_ratio_low must be ...``)."""
        betas_ok = isinstance(self.betas, tuple | list) and len(self.betas) == 2 and all(
            _is_number(b) and 0 <= b < 1 for b in self.betas)
        checks = [
            ("lr", _is_number(self.lr) and 0 < self.lr < math.inf, "must be > 0"),
            ("betas", betas_ok, "must be two numbers in [0, 1)"),
            ("weight_decay", _is_number(self.weight_decay) and self.weight_decay >= 0, "must be >= 0"),
            ("grad_clip", _is_number(self.grad_clip) and self.grad_clip > 0, "must be > 0"),
            ("clip_ratio_low", _is_number(self.clip_ratio_low) and 0 < self.clip_ratio_low < 1, "must be in (0, 1)"),
            ("clip_ratio_high", _is_number(self.clip_ratio_high) and self.clip_ratio_high > 0, "must be > 0"),
            ("kl_coef", _is_number(self.kl_coef) and self.kl_coef >= 0, "must be >= 0"),
            ("entropy_coef", _is_number(self.entropy_coef) and self.entropy_coef >= 0, "must be >= 0"),
            ("norm_adv_by_std", isinstance(self.norm_adv_by_std, bool), "must be true or false"),
            ("loss_agg", self.loss_agg in LOSS_AGGS, f"must be one of {', '.join(LOSS_AGGS)}"),
            ("ppo_epochs", _is_int(self.ppo_epochs) and self.ppo_epochs >= 1, "must be an integer >= 1"),
            ("mini_batch_size", _is_int(self.mini_batch_size) and self.mini_batch_size >= 0,
             "must be an integer >= 0 (0 = the whole batch)"),
            ("micro_batch_tokens", _is_int(self.micro_batch_tokens) and self.micro_batch_tokens >= 16,
             "must be an integer >= 16"),
            ("bf16_autocast", isinstance(self.bf16_autocast, bool), "must be true or false"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "must be an integer >= 0"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                raise ConfigError(f"{name} {requirement}, got {getattr(self, name)!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, norm_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-sample GRPO advantage ``(r - mean_g) / (std_g + eps)`` (or ``r - mean_g`` without std).

    ``groups[i]`` is the group id of sample ``i`` (samples answering the same prompt); ``std_g`` is the
    unbiased standard deviation. Singleton groups and groups whose rewards are all equal carry no signal
    and get exactly 0.
    """
    r = rewards.float()
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    n = counts.numel()
    mean = r.new_zeros(n).index_add_(0, inverse, r) / counts
    centred = r - mean[inverse]
    if norm_by_std:
        var = r.new_zeros(n).index_add_(0, inverse, centred.pow(2)) / (counts - 1).clamp_min(1)
        centred = centred / (var.sqrt()[inverse] + eps)
    hi = r.new_full((n,), -math.inf).scatter_reduce(0, inverse, r, "amax")
    lo = r.new_full((n,), math.inf).scatter_reduce(0, inverse, r, "amin")
    informative = (counts > 1) & (hi > lo)
    return torch.where(informative[inverse], centred, torch.zeros_like(centred))


def step_normaliser(response_lengths: Sequence[int], agg: LossAgg) -> float:
    """The normaliser of one optimizer step: its response tokens (``token-mean``) or its sequences."""
    total = sum(response_lengths) if agg == "token-mean" else len(response_lengths)
    return float(max(total, 1))


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: LossAgg,
              normaliser: float | None = None) -> torch.Tensor:
    """Reduce per-token ``values`` [B, T] over ``mask`` to a scalar: this batch's share of the step value.

    - ``token-mean``: ``sum(values * mask) / normaliser`` (``normaliser`` = valid tokens of the step);
    - ``seq-mean-token-mean``: per-sequence token mean, summed, ``/ normaliser`` (sequences of the step);
    - ``seq-mean-token-sum``: per-sequence token sum, summed, ``/ normaliser`` (sequences of the step).

    ``normaliser=None`` treats this batch as the whole step.
    """
    if normaliser is None:
        normaliser = float(max(int(mask.sum()) if agg == "token-mean" else mask.shape[0], 1))
    weights = mask.to(values.dtype)
    if agg == "token-mean":
        return (values * weights).sum() / normaliser
    per_seq = (values * weights).sum(-1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / weights.sum(-1).clamp_min(1)
    return per_seq.sum() / normaliser


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp``.

    Non-negative, exactly 0 where the log-probs agree; ``d`` is clamped to [-20, 20] against overflow.
    """
    d = (ref_logprobs - logprobs).clamp(-20, 20)
    return torch.exp(d) - d - 1


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float, clip_high: float, agg: LossAgg = "token-mean",
                normaliser: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped-ratio GRPO/PPO loss ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``, aggregated.

    All inputs are per token [B, T] (``advantages`` broadcast over a sequence's tokens). Returns the scalar
    loss (differentiable in ``logprobs``) and detached scalar diagnostics aggregated the same way, so they
    also sum over micro-batches: ``clip_fraction`` (share of tokens where the clip is active),
    ``approx_kl`` (``0.5 * (log r)^2``, KL(old || new) to second order) and ``ratio_mean``.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, agg, normaliser)
    with torch.no_grad():
        metrics = {
            "clip_fraction": aggregate((clipped < unclipped).float(), mask, agg, normaliser),
            "approx_kl": aggregate(0.5 * log_ratio.pow(2), mask, agg, normaliser),
            "ratio_mean": aggregate(ratio, mask, agg, normaliser),
        }
    return loss, metrics
