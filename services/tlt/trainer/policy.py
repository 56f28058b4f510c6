"""The policy trainer: GRPO updates with micro-batched gradient accumulation, AdamW and checkpoints.

Old log-probs are recomputed with the trainer's own weights before the update (the rollout engine's
bf16 log-probs differ slightly from the fp32 trainer's), so the ratio starts at exactly 1 on-policy.
Checkpoints are safetensors + JSON only (no pickle), written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tlt.errors import InvalidRequestError, ModelLoadError
from tlt.models.loader import hf_state_dict
from tlt.models.transformer import CausalLM
from tlt.trainer.grpo import GRPOConfig, aggregate, group_advantages, kl_k3, policy_loss


@dataclass
class Sample:
    """One rollout response with its reward; samples sharing ``group`` answered the same prompt."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    group: int


@dataclass
class MicroBatch:
    ids: torch.Tensor  # [B, T] right-padded prompt+response
    mask: torch.Tensor  # [B, T-1] true where position t+1 is a response token
    advantages: torch.Tensor  # [B]
    rows: list[int]  # sample indices


def pack(samples: list[Sample], indices: list[int], advantages: torch.Tensor, token_budget: int) -> list[MicroBatch]:
    """Split ``indices`` into right-padded micro-batches of at most ``token_budget`` padded tokens.

    Rows are grouped by length first: with long-tailed responses, mixing a 20-token and a 500-token row
    would spend most of the compute on padding. The loss is a sum, so the grouping does not change it.
    """
    batches, current = [], []
    indices = sorted(indices, key=lambda i: len(samples[i].prompt_ids) + len(samples[i].response_ids))

    def flush() -> None:
        if not current:
            return
        width = max(len(samples[i].prompt_ids) + len(samples[i].response_ids) for i in current)
        ids = torch.zeros(len(current), width, dtype=torch.long)
        mask = torch.zeros(len(current), width - 1, dtype=torch.bool)
        for row, i in enumerate(current):
            s = samples[i]
            seq = s.prompt_ids + s.response_ids
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, len(s.prompt_ids) - 1: len(seq) - 1] = True
        batches.append(MicroBatch(ids, mask, advantages[current], list(current)))
        current.clear()

    for i in indices:
        length = len(samples[i].prompt_ids) + len(samples[i].response_ids)
        width = max([length] + [len(samples[j].prompt_ids) + len(samples[j].response_ids) for j in current])
        if current and width * (len(current) + 1) > token_budget:
            flush()
        current.append(i)
    flush()
    return batches


def token_logprobs(model: CausalLM, ids: torch.Tensor, bf16: bool, with_entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each next token ``ids[:, 1:]`` under ``model`` (and the entropy of each position)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and ids.device.type == "cpu"):
        logits = model(ids[:, :-1]).logits
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return picked, entropy


class PolicyTrainer:
    """Trains ``model`` (fp32 weights, in place) with GRPO; ``reference`` enables the KL term."""

    def __init__(self, model: CausalLM, config: GRPOConfig, reference: CausalLM | None = None) -> None:
        if config.kl_coef > 0 and reference is None:
            raise InvalidRequestError("trainer.grpo.kl_coef > 0 needs a reference model")
        self.model = model.float().train()
        self.config = config
        self.reference = reference.eval() if reference is not None else None
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas)
        self.step = 0

    # ---- training -----------------------------------------------------------------------------

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One GRPO update on a batch of groups; returns metrics."""
        if not samples:
            raise InvalidRequestError("train_step needs at least one sample")
        bad = [i for i, s in enumerate(samples) if not s.prompt_ids or not s.response_ids]
        if bad:
            raise InvalidRequestError(f"sample {bad[0]} has an empty prompt or response")
        cfg = self.config
        start = time.perf_counter()
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        groups = torch.tensor([s.group for s in samples])
        advantages = group_advantages(rewards, groups, cfg.norm_adv_by_std)
        order = list(range(len(samples)))
        old, ref = self._reference_logprobs(samples, order, advantages)
        totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
        updates = 0
        generator = torch.Generator().manual_seed(cfg.seed + self.step)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(len(samples), generator=generator).tolist() if cfg.mini_batch_size else order
            size = cfg.mini_batch_size or len(samples)
            for lo in range(0, len(perm), size):
                stats = self._update(samples, perm[lo: lo + size], advantages, old, ref)
                for k in totals:
                    totals[k] += stats[k]
                updates += 1
        self.step += 1
        metrics = {k: v / updates for k, v in totals.items()}
        lengths = [len(s.response_ids) for s in samples]
        metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()) if len(samples) > 1 else 0.0,
                       response_len_mean=sum(lengths) / len(lengths), tokens=float(sum(lengths)),
                       seconds=time.perf_counter() - start, lr=cfg.lr, updates=float(updates))
        return metrics

    @torch.no_grad()
    def _reference_logprobs(self, samples, order, advantages
                            ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        old, ref = {}, {}
        for mb in pack(samples, order, advantages, self.config.micro_batch_tokens):
            lp, _ = token_logprobs(self.model, mb.ids, self.config.bf16_autocast)
            rlp = token_logprobs(self.reference, mb.ids, self.config.bf16_autocast)[0] if self.reference else None
            for row, i in enumerate(mb.rows):
                old[i] = lp[row]
                if rlp is not None:
                    ref[i] = rlp[row]
        return old, ref

    def _update(self, samples, indices, advantages, old, ref) -> dict[str, float]:
        cfg = self.config
        batches = pack(samples, indices, advantages, cfg.micro_batch_tokens)
        if cfg.loss_agg == "token-mean":
            normaliser = float(sum(len(samples[i].response_ids) for i in indices))
        else:
            normaliser = float(len(indices))
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        tokens = float(sum(len(samples[i].response_ids) for i in indices))
        for mb in batches:
            width = mb.ids.shape[1] - 1
            logp, entropy = token_logprobs(self.model, mb.ids, cfg.bf16_autocast, with_entropy=True)
            old_lp = torch.stack([_fit(old[i], width) for i in mb.rows])
            adv = mb.advantages[:, None].expand_as(logp)
            pg, info = policy_loss(logp, old_lp, adv, mb.mask, cfg.clip_ratio_low, cfg.clip_ratio_high)
            loss = aggregate(pg, mb.mask, cfg.loss_agg, normaliser)
            pg_value = float(loss.detach())
            if cfg.kl_coef > 0:
                ref_lp = torch.stack([_fit(ref[i], width) for i in mb.rows])
                kl = aggregate(kl_k3(logp, ref_lp), mb.mask, cfg.loss_agg, normaliser)
                loss = loss + cfg.kl_coef * kl
                stats["kl"] += float(kl.detach())
            ent = aggregate(entropy, mb.mask, cfg.loss_agg, normaliser)
            if cfg.entropy_coef > 0:
                loss = loss - cfg.entropy_coef * ent
            loss.backward()
            stats["loss"] += float(loss.detach())
            stats["pg_loss"] += pg_value
            stats["entropy"] += float(ent.detach())
            stats["clip_fraction"] += float((info["clipped"] * mb.mask).sum()) / max(tokens, 1.0)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        stats["grad_norm"] = float(grad_norm)
        return stats

    # ---- weights and checkpoints --------------------------------------------------------------

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy under Hugging Face names (what rollout engines load)."""
        return hf_state_dict(self.model)

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Weights, AdamW state and step counter as safetensors + JSON, replacing ``directory`` atomically."""
        directory = Path(directory)
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        params = list(self.model.parameters())
        index = {id(p): i for i, p in enumerate(params)}
        weights = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        opt_tensors, opt_steps = {}, {}
        for p, state in self.optimizer.state.items():
            i = index[id(p)]
            opt_tensors[f"{i}.exp_avg"] = state["exp_avg"].contiguous()
            opt_tensors[f"{i}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
            opt_steps[str(i)] = float(state["step"])
        save_file(opt_tensors or {"empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        meta = {"step": self.step, "optimizer_steps": opt_steps, "config": asdict(self.config),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
        if directory.exists():
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore weights, optimizer state and the step counter written by :meth:`save_checkpoint`."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "trainer.json").read_text())
            weights = load_file(str(directory / "model.safetensors"))
            opt = load_file(str(directory / "optimizer.safetensors"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"checkpoint {directory} is unreadable ({exc}); delete it to start over") from None
        self.model.load_state_dict(weights)
        params = list(self.model.parameters())
        self.optimizer.state.clear()
        for key, step in meta["optimizer_steps"].items():
            p = params[int(key)]
            self.optimizer.state[p] = {"step": torch.tensor(step), "exp_avg": opt[f"{key}.exp_avg"].clone(),
                                       "exp_avg_sq": opt[f"{key}.exp_avg_sq"].clone()}
        for group, saved in zip(self.optimizer.param_groups, meta["param_groups"]):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
        self.step = int(meta["step"])


def _fit(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pad or cut a per-token vector recorded in another micro-batch layout to ``width``."""
    if values.shape[0] >= width:
        return values[:width]
    return F.pad(values, (0, width - values.shape[0]))
