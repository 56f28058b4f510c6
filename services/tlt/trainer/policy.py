"""The policy trainer: GRPO updates with micro-batched gradient accumulation, AdamW and checkpoints.

One :meth:`PolicyTrainer.train_step` takes a batch of scored rollouts (:class:`Sample`; the samples that share
``group`` answered the same prompt) and:

1. computes group-normalised advantages;
2. plans the optimizer updates: ``ppo_epochs`` passes over the batch, each cut into mini-batches of
   ``mini_batch_size`` samples (shuffled with a generator seeded by ``(seed, step)``, ``step`` being the
   optimizer updates so far, so resuming from a checkpoint replays the same order);
3. recomputes the old log-probs with the current weights under ``no_grad`` (the rollout engine's bf16
   log-probs differ slightly from the trainer's), so the ratio starts at exactly 1. When the step is a single
   update the old log-probs *are* the current ones and that extra forward is skipped;
4. for each update packs its samples into right-padded micro-batches of at most ``micro_batch_tokens``
   padded tokens (loss mask over response tokens only), accumulates the gradients of their losses, each
   normalised by the whole update's token (or sequence) count, clips and takes one AdamW step.

Data-parallel training (:mod:`tlt.trainer.distributed`) reuses this class: each rank runs the same plan on its
own shard of the samples and all-reduces the gradients (:meth:`PolicyTrainer._all_reduce`).

Checkpoints are safetensors + JSON only (no pickle), written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tlt.errors import ConfigError, InvalidRequestError, ModelLoadError
from tlt.models.loader import hf_state_dict
from tlt.models.transformer import CausalLM
from tlt.trainer.grpo import GRPOConfig, aggregate, group_advantages, kl_k3, policy_loss, step_normaliser

CHECKPOINT_FORMAT = 1
MODEL_FILE, OPTIMIZER_FILE, META_FILE = "model.safetensors", "optimizer.safetensors", "trainer.json"
# Per-update statistics, each a share of the update's value (they sum over micro-batches and ranks).
LOSS_STATS = ("loss", "pg_loss", "kl", "entropy", "clip_fraction", "approx_kl", "ratio_mean")


@dataclass
class Sample:
    """One rollout response with its reward; samples sharing ``group`` answered the same prompt."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    group: int


class PolicyTrainerAPI(Protocol):
    """What the controller needs from a policy trainer (single process or data-parallel)."""

    step: int

    def train_step(self, samples: list[Sample]) -> dict[str, float]: ...

    def policy_state(self) -> dict[str, torch.Tensor]: ...

    def save_checkpoint(self, directory: str | Path) -> Path: ...

    def load_checkpoint(self, directory: str | Path) -> None: ...


def validate_samples(samples: Sequence[Sample], vocab_size: int | None = None, max_tokens: int | None = None
                     ) -> None:
    """Refuse an empty batch, empty prompts or responses, token ids outside ``[0, vocab_size)`` and samples
    longer than ``max_tokens`` (the model's rotary table)."""
    if not samples:
        raise InvalidRequestError("train_step needs at least one sample")
    for i, s in enumerate(samples):
        length = len(s.prompt_ids) + len(s.response_ids)
        if not s.prompt_ids or not s.response_ids:
            raise InvalidRequestError(f"sample {i} has an empty prompt or response")
        if vocab_size is not None and not all(0 <= t < vocab_size for t in (*s.prompt_ids, *s.response_ids)):
            raise InvalidRequestError(f"sample {i} has token ids outside the model's vocabulary [0, {vocab_size})")
        if max_tokens is not None and length > max_tokens:
            raise InvalidRequestError(f"sample {i} has {length} tokens, more than the model's {max_tokens} positions")


# ---- micro-batches ----------------------------------------------------------------------------

@dataclass
class MicroBatch:
    """Right-padded rows of prompt+response ids and the mask of the positions that predict a response token.

    ``mask[b, t]`` is True where ``ids[b, t + 1]`` is a response token of row ``b``; the True entries of a
    row are contiguous, so ``values[mask]`` lists the rows' response tokens one row after the other.
    """

    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T - 1]
    rows: list[int]  # sample index of each row

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-row response vectors of a per-position tensor [B, T - 1]."""
        return list(torch.split(values[self.mask], self.mask.sum(-1).tolist()))

    def scatter(self, per_sample: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split`: per-sample response vectors laid out as [B, T - 1] (0 elsewhere)."""
        out = torch.zeros(self.mask.shape, dtype=torch.float32, device=self.mask.device)
        out[self.mask] = torch.cat([per_sample[i] for i in self.rows]).to(out.device)
        return out


def pack(samples: Sequence[Sample], indices: Collection[int], token_budget: int,
         device: torch.device | str = "cpu") -> list[MicroBatch]:
    """Split ``indices`` into micro-batches of at most ``token_budget`` padded tokens (one row may exceed it).

    Rows are sorted by length first: with long-tailed responses, mixing a 20-token and a 500-token row would
    spend most of the compute on padding. Losses are sums, so the grouping does not change the result.
    """
    def length(i: int) -> int:
        return len(samples[i].prompt_ids) + len(samples[i].response_ids)

    groups: list[list[int]] = []
    for i in sorted(indices, key=length):  # ascending, so the newest row sets the padded width
        if groups and length(i) * (len(groups[-1]) + 1) <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [_collate(samples, rows, device) for rows in groups]


def _collate(samples: Sequence[Sample], rows: list[int], device: torch.device | str) -> MicroBatch:
    width = max(len(samples[i].prompt_ids) + len(samples[i].response_ids) for i in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for row, i in enumerate(rows):
        prompt, response = samples[i].prompt_ids, samples[i].response_ids
        ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        mask[row, len(prompt) - 1: len(prompt) + len(response) - 1] = True
    return MicroBatch(ids.to(device), mask.to(device), rows)


def token_logprobs(model: CausalLM, ids: torch.Tensor, bf16: bool = False, with_entropy: bool = False,
                   entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each next token ``ids[:, 1:]`` under ``model`` [B, T - 1], and optionally the entropy of
    each position's distribution (detached unless ``entropy_grad``). ``bf16`` runs the forward under bf16
    autocast; the softmax is always fp32."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids[:, :-1]).logits
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - lse
    if not with_entropy:
        return picked, None
    source, norm = (logits, lse) if entropy_grad else (logits.detach(), lse.detach())
    entropy = norm - (torch.softmax(source, dim=-1) * source).sum(-1)
    return picked, entropy


def plan_updates(num_samples: int, config: GRPOConfig, step: int) -> list[list[int]]:
    """Sample indices of each optimizer update of one train step: ``ppo_epochs`` passes, each cut into
    mini-batches of ``mini_batch_size`` (reshuffled per pass when that is smaller than the batch). ``step``
    (the trainer's update count) seeds the shuffle."""
    size = config.mini_batch_size or num_samples
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    plan: list[list[int]] = []
    for _ in range(config.ppo_epochs):
        order = torch.randperm(num_samples, generator=generator).tolist() if size < num_samples \
            else list(range(num_samples))
        plan += [order[lo: lo + size] for lo in range(0, num_samples, size)]
    return plan


def model_limits(model: CausalLM) -> tuple[int, int]:
    """(vocabulary size, longest sequence) that ``model`` accepts."""
    return model.config.vocab_size, model.rope_cos.shape[0]


def batch_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """Reward and length statistics of a batch (``tokens`` counts response tokens)."""
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    lengths = [len(s.response_ids) for s in samples]
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(samples) > 1 else 0.0,
            "response_len_mean": sum(lengths) / len(lengths), "tokens": float(sum(lengths))}


# ---- the trainer ------------------------------------------------------------------------------

class PolicyTrainer:
    """Trains ``model`` (fp32 weights, in place) with GRPO; ``reference`` enables the KL term and metric.

    ``step`` counts optimizer updates (a train step holds several when ``mini_batch_size`` or ``ppo_epochs``
    ask for it; its metrics report how many as ``updates``).
    """

    def __init__(self, model: CausalLM, config: GRPOConfig, reference: CausalLM | None = None) -> None:
        if config.kl_coef > 0 and reference is None:
            raise ConfigError(f"kl_coef {config.kl_coef} > 0 needs a reference model; pass reference= or set 0")
        self.config = config
        self.model = model.float().train()
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=tuple(config.betas))
        self.step = 0

    # ---- training -----------------------------------------------------------------------------

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One GRPO train step on a batch of groups; returns averaged metrics (see module docstring)."""
        return self._train_step(samples, range(len(samples)))

    def _train_step(self, samples: Sequence[Sample], owned: Collection[int]) -> dict[str, float]:
        """The train step of a worker that computes on the samples ``owned`` (all of them unless data-parallel)
        while advantages, the update plan and the normalisers come from the whole batch."""
        validate_samples(samples, *model_limits(self.model))
        start = time.perf_counter()
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        groups = torch.tensor([s.group for s in samples])
        advantages = group_advantages(rewards, groups, self.config.norm_adv_by_std).to(self.model.device)
        updates = plan_updates(len(samples), self.config, self.step)
        mine = set(owned)
        old = self._response_logprobs(self.model, samples, mine) if len(updates) > 1 else None
        ref = self._response_logprobs(self.reference, samples, mine) if self.reference is not None else None
        totals = sum(self._update(samples, indices, [i for i in indices if i in mine], advantages, old, ref)
                     for indices in updates)
        self.step += len(updates)
        metrics = dict(zip((*LOSS_STATS, "grad_norm"), (totals / len(updates)).tolist()))
        metrics.update(batch_metrics(samples), updates=float(len(updates)), lr=self.optimizer.param_groups[0]["lr"],
                       seconds=time.perf_counter() - start)
        return metrics

    @torch.no_grad()
    def _response_logprobs(self, model: CausalLM, samples: Sequence[Sample],
                           indices: Collection[int]) -> dict[int, torch.Tensor]:
        """Log-probs of each sample's response tokens under ``model`` (no gradient)."""
        out: dict[int, torch.Tensor] = {}
        for mb in pack(samples, indices, self.config.micro_batch_tokens, self.model.device):
            logp, _ = token_logprobs(model, mb.ids, self.config.bf16_autocast)
            out.update(zip(mb.rows, mb.split(logp)))
        return out

    def _update(self, samples: Sequence[Sample], indices: list[int], local: list[int], advantages: torch.Tensor,
                old: dict[int, torch.Tensor] | None, ref: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """One optimizer update over the samples ``indices`` (computing on ``local``); returns the update's
        ``LOSS_STATS`` and grad norm."""
        cfg = self.config
        normaliser = step_normaliser([len(samples[i].response_ids) for i in indices], cfg.loss_agg)
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.zeros(len(LOSS_STATS))
        for mb in pack(samples, local, cfg.micro_batch_tokens, self.model.device):
            loss, values = self._micro_batch_loss(mb, advantages, old, ref, normaliser)
            loss.backward()
            stats += values
        params = list(self.model.parameters())
        for p in params:  # a data-parallel rank with no sample in this update still joins the all-reduce
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._all_reduce([*(p.grad for p in params), stats])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        self.optimizer.step()
        return torch.cat([stats, grad_norm.detach().float().cpu().reshape(1)])

    def _micro_batch_loss(self, mb: MicroBatch, advantages: torch.Tensor, old: dict[int, torch.Tensor] | None,
                          ref: dict[int, torch.Tensor] | None, normaliser: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's share of the update loss and of each ``LOSS_STATS`` value."""
        cfg = self.config
        logp, entropy = token_logprobs(self.model, mb.ids, cfg.bf16_autocast, with_entropy=True,
                                       entropy_grad=cfg.entropy_coef > 0)
        old_lp = logp.detach() if old is None else mb.scatter(old)
        adv = advantages[mb.rows][:, None].expand_as(logp)
        pg, info = policy_loss(logp, old_lp, adv, mb.mask, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.loss_agg,
                               normaliser)
        ent = aggregate(entropy, mb.mask, cfg.loss_agg, normaliser)
        kl = aggregate(kl_k3(logp, mb.scatter(ref)), mb.mask, cfg.loss_agg, normaliser) if ref is not None \
            else torch.zeros((), device=logp.device)
        loss = pg
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ent
        values = torch.stack([loss, pg, kl, ent, info["clip_fraction"], info["approx_kl"], info["ratio_mean"]])
        return loss, values.detach().float().cpu()

    def _all_reduce(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` (gradients and statistics) in place across data-parallel workers; none here."""

    # ---- weights and checkpoints --------------------------------------------------------------

    def policy_state(self) -> dict[str, torch.Tensor]:
        """The policy as Hugging Face-named bf16 tensors (copies; what rollout engines load)."""
        return {name: t.to(torch.bfloat16, copy=True).contiguous() for name, t in hf_state_dict(self.model).items()}

    def _param_names(self) -> list[str]:
        """Parameter names in the optimizer's state-dict index order."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write weights, AdamW state and the update counter as safetensors + JSON, replacing ``directory``
        atomically (a reader sees the old checkpoint or the new one, never a mix)."""
        def write(tmp: Path) -> None:
            weights = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(weights, str(tmp / MODEL_FILE))
            tensors, scalars = flatten_optimizer_state(self.optimizer.state_dict()["state"], self._param_names())
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            meta = {"format": CHECKPOINT_FORMAT, "step": self.step, "optimizer_scalars": scalars,
                    "config": asdict(self.config)}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        return replace_dir_atomically(Path(directory), write)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore weights, AdamW state and the update counter written by :meth:`save_checkpoint`.

        Hyperparameters (lr, betas, ...) come from this trainer's config, not from the checkpoint.
        """
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            weights = load_file(str(directory / MODEL_FILE))
            opt_tensors = load_file(str(directory / OPTIMIZER_FILE))
        except (OSError, ValueError, SafetensorError) as exc:
            raise ModelLoadError(f"checkpoint {directory} is unreadable ({exc}); delete it to start over") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ModelLoadError(f"checkpoint {directory} has format {meta.get('format')!r}, "
                                 f"this version reads {CHECKPOINT_FORMAT}")
        names = self._param_names()
        _check_names(directory / MODEL_FILE, set(weights), set(names))
        state = unflatten_optimizer_state(opt_tensors, meta.get("optimizer_scalars", {}), names,
                                          directory / OPTIMIZER_FILE)
        try:
            with torch.no_grad():
                self.model.load_state_dict(weights)
        except RuntimeError as exc:
            raise ModelLoadError(f"checkpoint {directory / MODEL_FILE} does not fit the model: {exc}") from None
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = state
        self.optimizer.load_state_dict(optimizer_state)
        self.step = int(meta["step"])


def make_policy_trainer(model: CausalLM, config: GRPOConfig, reference: CausalLM | None = None,
                        workers: int = 1, **ray_options: Any) -> PolicyTrainerAPI:
    """A :class:`PolicyTrainer` for one worker, a Ray data-parallel trainer for ``workers > 1``."""
    if workers <= 1:
        return PolicyTrainer(model, config, reference)
    from tlt.trainer.distributed import RayPolicyTrainer

    return RayPolicyTrainer(model, config, reference, num_workers=workers, **ray_options)


# ---- checkpoint helpers ----------------------------------------------------------------------

def flatten_optimizer_state(state: Mapping[int, Mapping[str, Any]], names: Sequence[str]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Split an optimizer ``state_dict()["state"]`` into safetensors entries ``"<param>:<key>"`` (every
    tensor, 0-dim ones included, dtype kept) and JSON-able non-tensor values ``{param: {key: value}}``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[index]}:{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[index], {})[key] = value
    return tensors, scalars


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Mapping[str, Any]],
                              names: Sequence[str], source: Path) -> dict[int, dict[str, Any]]:
    """The inverse of :func:`flatten_optimizer_state`, keyed by optimizer index again."""
    index = {name: i for i, name in enumerate(names)}
    params = {key.rpartition(":")[0] for key in tensors} | set(scalars)
    unknown = sorted(params - set(index))
    if unknown:
        raise ModelLoadError(f"{source} holds optimizer state for unknown parameters: {', '.join(unknown[:5])}")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(":")
        state.setdefault(index[name], {})[field] = value
    for name, entries in scalars.items():
        state.setdefault(index[name], {}).update(entries)
    return state


def _check_names(source: Path, found: set[str], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ModelLoadError(f"{source} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def replace_dir_atomically(directory: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a sibling temp directory, then swap it in for ``directory``.

    A failed ``write`` leaves ``directory`` untouched. The swap is two renames (old out, new in); a crash
    between them leaves the complete old copy as ``.<name>.old-*`` next to it.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex}")
    if directory.exists():
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory
