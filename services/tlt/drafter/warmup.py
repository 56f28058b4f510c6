"""Offline drafter warm-up: train an EAGLE-3 drafter on sequences the target generated itself."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tlt.drafter.train_config import DrafterTrainConfig
from tlt.drafter.trainer import eagle3_loss, target_batch
from tlt.fsutil import COMPLETE_MARKER
from tlt.models.drafter import DrafterConfig, Eagle3Drafter
from tlt.models.transformer import CausalLM
from tlt.schedules import warmup_cosine


@dataclass
class Example:
    """A prompt and the target's own response to it (token ids)."""

    prompt_ids: list[int]
    response_ids: list[int]


def new_drafter(target: CausalLM, aux_layer_ids: tuple[int, ...] | None = None, seed: int = 0) -> Eagle3Drafter:
    """A randomly initialised fp32 drafter sized for ``target``."""
    drafter = Eagle3Drafter(DrafterConfig.from_target(target.config, aux_layer_ids), target.embed,
                            max_positions=target.rope_cos.shape[0])
    drafter.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return drafter.to(device=target.device, dtype=torch.float32)


def collate(examples: Sequence[Example], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a mask that is true on response tokens (what the drafter must predict)."""
    rows = [(ex.prompt_ids + ex.response_ids)[:max_len] for ex in examples]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, ex) in enumerate(zip(rows, examples)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, len(ex.prompt_ids): len(row)] = True
    return ids, mask


def lr_at(step: int, cfg: DrafterTrainConfig) -> float:
    """Linear warm-up then cosine decay to 10%."""
    return warmup_cosine(step, cfg.lr, cfg.warmup_steps, cfg.steps, 0.1)


def train_drafter(
    target: CausalLM,
    drafter: Eagle3Drafter,
    examples: Sequence[Example],
    cfg: DrafterTrainConfig,
    on_step: Callable[[int, dict], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Train ``drafter`` in place on ``examples``; returns a summary (losses, accuracies, time)."""
    if not examples:
        raise ValueError("train_drafter needs at least one example")
    rng = random.Random(cfg.seed)
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    drafter.train()
    start = time.perf_counter()
    history = []
    order: list[int] = []
    step = 0
    for step in range(cfg.steps):
        if should_stop is not None and should_stop():
            break
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        batch_ids, order = order[: cfg.batch_size], order[cfg.batch_size:]
        ids, mask = collate([examples[i] for i in batch_ids], cfg.max_len)
        batch = target_batch(target, ids.to(target.device), mask.to(target.device), drafter.config.aux_layer_ids)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        report = eagle3_loss(drafter, batch, steps=cfg.ttt_steps, decay=cfg.ttt_decay)
        optimizer.zero_grad(set_to_none=True)
        report.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        row = {"step": step, "loss": float(report.loss.detach()), "acc": report.step_accuracy, "tokens": report.tokens}
        history.append(row)
        if on_step is not None:
            on_step(step, row)
    drafter.eval()
    tail = history[-10:] or [{"loss": float("nan"), "acc": []}]
    return {
        "steps": len(history),
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "final_step_accuracy": [sum(r["acc"][k] for r in tail) / len(tail) for k in range(len(tail[0]["acc"]))],
        "seconds": time.perf_counter() - start,
    }


def self_generated_examples(target: CausalLM, prompts: Sequence[list[int]], max_new_tokens: int,
                            temperature: float = 1.0, seed: int = 0, max_running: int = 64) -> list[Example]:
    """Let the target answer ``prompts`` (seeded sampling) and pair each prompt with its response."""
    from tlt.rollout.engine import RolloutEngine
    from tlt.rollout.sampling import SamplingParams

    engine = RolloutEngine(target, max_running=max_running, seed=seed)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    return [Example(list(p), o.token_ids) for p, o in zip(prompts, engine.generate(prompts, params))]


def demo_prompt_ids(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Token ids of ``count`` demo-task prompts."""
    from tlt.data.demo_task import generate_problems

    return [tokenizer.encode(p.prompt, add_special_tokens=False) for p in generate_problems(count, seed)]


def warmup_drafter(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    prompts: Sequence[list[int]] | None = None,
    num_prompts: int = 512,
    max_new_tokens: int = 512,
    train: DrafterTrainConfig | None = None,
    aux_layer_ids: tuple[int, ...] | None = None,
    progress: bool = True,
) -> dict:
    """Offline warm-up: the target answers prompts at temperature 1, the drafter learns from it.

    ``prompts`` default to demo-task prompts. Writes an EAGLE-3 checkpoint plus
    ``warmup_summary.json`` to ``out_dir`` and returns the summary.
    """
    from transformers import AutoTokenizer

    from tlt.models.drafter_io import save_drafter
    from tlt.models.loader import load_model

    cfg = train or DrafterTrainConfig()
    start = time.perf_counter()
    target = load_model(model_dir, dtype="bfloat16")
    drafter = new_drafter(target, aux_layer_ids, seed=cfg.seed)  # validates the layer ids before generating
    if prompts is None:
        prompts = demo_prompt_ids(AutoTokenizer.from_pretrained(str(model_dir)), num_prompts, cfg.seed + 17)
    examples = self_generated_examples(target, prompts, max_new_tokens, seed=cfg.seed)
    gen_s = time.perf_counter() - start
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="drafter warm-up", unit="step")

    def on_step(step: int, row: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc0=f"{row['acc'][0]:.2f}")

    summary = train_drafter(target, drafter, examples, cfg, on_step=on_step)
    if bar is not None:
        bar.close()
    save_drafter(drafter, out_dir)
    summary.update(
        examples=len(examples), generated_tokens=sum(len(e.response_ids) for e in examples),
        generation_s=round(gen_s, 1), total_s=round(time.perf_counter() - start, 1),
        config=asdict(cfg), aux_layer_ids=list(drafter.config.aux_layer_ids),
    )
    (Path(out_dir) / "warmup_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (Path(out_dir) / COMPLETE_MARKER).write_text("ok\n")  # last: a partial directory never looks finished
    return summary


def default_demo_drafter_dir() -> Path:
    from tlt.models.demo import tlt_home

    return tlt_home() / "models" / "demo-drafter"


def ensure_demo_drafter(model_dir: str | Path | None = None, out_dir: str | Path | None = None,
                        **kwargs) -> Path:
    """Warm up a drafter for the demo model once and reuse it (keyword args go to warmup_drafter)."""
    from tlt.fsutil import build_once
    from tlt.models.demo import ensure_demo_model

    model_dir = model_dir or ensure_demo_model()
    return build_once(out_dir or default_demo_drafter_dir(), lambda tmp: warmup_drafter(model_dir, tmp, **kwargs))
