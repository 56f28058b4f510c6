"""EAGLE-3 training loss with training-time test (unrolled draft steps), and a training loop.

Alignment (explicit, unpadded coordinates): for a sequence ``x_0..x_{T-1}`` with target features
``f_j`` (the three aux hidden states at position ``j``) and target logits ``z_j``, drafter entry ``j``
is ``(f_j, x_{j+1})`` at rotary position ``j`` and is trained towards the target distribution
``softmax(z_{j+1})``, i.e. the distribution of ``x_{j+2}``.

Training-time test: draft step ``k`` (``k = 1..steps-1``) re-runs entry ``j`` with the hidden state the
drafter itself produced for entry ``j-1`` at step ``k-1`` instead of ``f_j``, and attends to what it
would see at inference: step-0 entries at positions ``<= j-k`` and the step-``i`` entries at positions
``j-k+i`` for ``i = 1..k``. Step ``k``'s loss is weighted ``decay**k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tlt.models.drafter import Eagle3Drafter
from tlt.models.transformer import CausalLM


@dataclass
class TargetBatch:
    """Token ids and what the target computed for them (features, logits), plus the loss mask."""

    input_ids: torch.Tensor  # [B, T]
    features: torch.Tensor  # [B, T, 3*H_target]
    logits: torch.Tensor  # [B, T, V]
    loss_mask: torch.Tensor  # [B, T] bool: position's token is one the drafter should learn to predict


@torch.no_grad()
def target_batch(target: CausalLM, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                 aux_layers: tuple[int, ...]) -> TargetBatch:
    """Run the target (prefill, no cache) to get features and logits for drafter training."""
    out = target(input_ids, hidden_layers=aux_layers)
    feats = torch.cat([out.hidden[j] for j in aux_layers], dim=-1)
    return TargetBatch(input_ids, feats, out.logits, loss_mask)


@dataclass
class LossReport:
    """Loss and per-step top-1 agreement with the target's argmax."""

    loss: torch.Tensor
    step_losses: list[float]
    step_accuracy: list[float]
    tokens: int


def _entry_valid(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: entry j predicts x_{j+2}, so it counts where that token exists and is in the loss mask."""
    b, t = loss_mask.shape
    valid = torch.zeros(b, t - 1, dtype=torch.bool, device=loss_mask.device)
    valid[:, : t - 2] = loss_mask[:, 2:]
    return valid


def step_valid_counts(loss_mask: torch.Tensor, steps: int) -> list[int]:
    """Per unrolled step, how many entries :func:`eagle3_loss` averages over for this (collated) mask."""
    valid = _entry_valid(loss_mask)
    return [int(valid[:, k:].sum()) for k in range(steps)]


def eagle3_loss(drafter: Eagle3Drafter, batch: TargetBatch, steps: int = 4, decay: float = 0.8,
                counts: Sequence[int] | None = None) -> LossReport:
    """Unrolled EAGLE-3 loss (soft cross-entropy against the target distribution) over ``steps``.

    ``counts``: per-step denominators (default: this batch's own). A batch split into micro-batches passes
    the whole batch's (:func:`step_valid_counts` of its mask), so that the micro-batches' losses,
    gradients and agreements add up to the whole batch's."""
    ids, feats, logits = batch.input_ids, batch.features, batch.logits
    b, t = ids.shape
    n = t - 1  # entries j = 0..T-2
    device = ids.device
    tokens = ids[:, 1:]
    positions = torch.arange(n, device=device)[None].expand(b, n)
    valid = _entry_valid(batch.loss_mask)
    target_p = torch.softmax(logits[:, 1:].float(), dim=-1)[..., drafter.draft_to_target]
    target_p = target_p / target_p.sum(-1, keepdim=True).clamp_min(1e-9)
    target_top = target_p.argmax(-1)

    hidden = drafter.fuse(feats[:, :-1])
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    total = torch.zeros((), device=device)
    step_losses, step_acc = [], []
    j = torch.arange(n, device=device)
    for k in range(steps):
        q, key, value = drafter.qkv(tokens, hidden, positions)
        keys.append(key)
        values.append(value)
        # mask over [step-0 block | step-1 block | ... | step-k block], each n wide
        blocks = [j[None, :] <= (j[:, None] - k)]
        blocks += [j[None, :] == (j[:, None] - k + i) for i in range(1, k + 1)]
        mask = torch.cat(blocks, dim=1)
        attn = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                                              enable_gqa=True)
        out = drafter.finish(attn, hidden)
        step_valid = valid & (j[None, :] >= k)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        per_token = -(target_p * logp).sum(-1)
        count = step_valid.sum().clamp_min(1) if counts is None else max(counts[k], 1)
        step_loss = (per_token * step_valid).sum() / count
        total = total + decay**k * step_loss
        step_losses.append(float(step_loss.detach()))
        step_acc.append(float(((logp.argmax(-1) == target_top) & step_valid).sum() / count))
        # Next step: entry j gets the hidden state this step produced for entry j-1.
        hidden = torch.cat([out.hidden[:, :1], out.hidden[:, :-1]], dim=1)
    return LossReport(total, step_losses, step_acc, int(valid.sum()))
