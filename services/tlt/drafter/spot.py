"""Preemptible drafter training on an idle rollout worker (the worker's "drafter" role).

The worker keeps the responses it finished in this step. When the planner gives it the drafter role,
:meth:`SpotDrafterTrainer.train` starts from the newest published drafter, recomputes the target's
hidden states by prefill with the policy the worker already holds (no hidden states cross the network),
trains with the EAGLE-3 loss and pushes its weight delta every ``push_every`` steps and when stopped.
A step runs in micro-batches of ``MICRO_BATCH`` responses (gradients accumulated, losses normalised over
the whole batch, so the step is the same as one over the batch) and ``should_stop`` is checked before
each: preemption waits for at most one micro-batch, applies the step to the micro-batches that ran, and
pushes the work since the last push on the way out.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import torch

from tlt.drafter.aggregator import trainable_state
from tlt.drafter.trainer import eagle3_loss, step_valid_counts, target_batch
from tlt.drafter.warmup import Example, collate
from tlt.models.drafter import Eagle3Drafter
from tlt.models.transformer import CausalLM
from tlt.rpc.errors import RpcError

log = logging.getLogger(__name__)
AGGREGATOR_AWAY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)  # worth keeping the work for

PushFn = Callable[[dict[str, torch.Tensor], int], None]
# Responses per micro-batch: the preemption latency. With whole steps (8 responses: target prefill and 4
# unrolled drafter steps, forward and backward) the drafter role outlasted the rollout by 0.1-2.5 s
# (benchmarks/e2e.py, role spans), and the RL step waited for it.
MICRO_BATCH = 2


@dataclass
class SpotReport:
    """What one stint in the drafter role did."""

    steps: int = 0
    tokens: int = 0
    pushes: int = 0
    seconds: float = 0.0
    last_loss: float | None = None
    last_accuracy: list[float] | None = None
    preempted: bool = False
    failed_pushes: int = 0  # pushes the aggregator did not take; their work rides on the next push


class SpotDrafterTrainer:
    """One worker's drafter copy, its optimizer and its buffer of finished responses.

    Args:
        target: the worker's policy (used under no_grad for features and target logits).
        drafter_template: a drafter of the right shape (e.g. the engine's); the trainer keeps an fp32 copy.
        push: called with (delta by parameter name, target tokens trained on) to hand work to the aggregator.
    """

    def __init__(self, target: CausalLM, drafter_template: Eagle3Drafter, push: PushFn, *, lr: float,
                 batch_size: int, push_every: int, ttt_steps: int = 4, max_len: int = 1024,
                 buffer_responses: int = 512, seed: int = 0) -> None:
        self.target = target
        self.drafter = drafter_template.copy_for(target).float()
        self.push = push
        self.batch_size = batch_size
        self.push_every = push_every
        self.ttt_steps = ttt_steps
        self.max_len = max_len
        self.buffer: deque[Example] = deque(maxlen=buffer_responses)
        self.optimizer = torch.optim.AdamW(self.drafter.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        self._rng = random.Random(seed)
        self._anchor: dict[str, torch.Tensor] = {}
        self._unpushed_tokens = 0

    def add_response(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> None:
        """Keep a finished response for training (the oldest fall out of the bounded buffer)."""
        if response_ids:
            self.buffer.append(Example(list(prompt_ids), list(response_ids)))

    def clear_buffer(self) -> None:
        self.buffer.clear()

    def start_from(self, weights: dict[str, torch.Tensor]) -> None:
        """Load a published version's weights (by parameter name) as the new starting point."""
        with torch.no_grad():
            for name, param in self.drafter.named_parameters():
                param.copy_(weights[name])
        self._anchor = trainable_state(self.drafter)
        self._unpushed_tokens = 0

    def train(self, should_stop: Callable[[], bool], max_steps: int | None = None) -> SpotReport:
        """Train until ``should_stop()`` (or ``max_steps``); push every ``push_every`` steps and at the end."""
        report = SpotReport()
        if len(self.buffer) == 0:
            return report
        if not self._anchor:
            self._anchor = trainable_state(self.drafter)
        start = time.perf_counter()
        self.drafter.train()
        try:
            while not should_stop():
                if max_steps is not None and report.steps >= max_steps:
                    break
                if not self._train_step(report, should_stop):
                    break
                if report.steps % self.push_every == 0:
                    self._push(report)
            report.preempted = max_steps is None or report.steps < max_steps
        finally:
            self._push(report)
            self.drafter.eval()
            report.seconds = time.perf_counter() - start
        return report

    def _train_step(self, report: SpotReport, should_stop: Callable[[], bool]) -> bool:
        """One optimizer step on a sampled batch, in micro-batches with a stop check between them. Stopped
        part-way, the step is applied to the micro-batches that ran (as a step on those responses alone) and
        False is returned."""
        examples = self._rng.sample(list(self.buffer), min(self.batch_size, len(self.buffer)))
        counts = step_valid_counts(collate(examples, self.max_len)[1], self.ttt_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss, accuracy, tokens, done = 0.0, [0.0] * self.ttt_steps, 0, 0
        stopped = False
        for first in range(0, len(examples), MICRO_BATCH):
            if first and should_stop():
                stopped = True
                break
            ids, mask = collate(examples[first:first + MICRO_BATCH], self.max_len)
            device = self.drafter.embed.device  # the target's (its embedding is shared)
            batch = target_batch(self.target, ids.to(device), mask.to(device), self.drafter.config.aux_layer_ids)
            part = eagle3_loss(self.drafter, batch, steps=self.ttt_steps, counts=counts)
            part.loss.backward()
            loss += float(part.loss.detach())
            accuracy = [a + b for a, b in zip(accuracy, part.step_accuracy)]
            tokens += part.tokens
            done += sum(step_valid_counts(mask, self.ttt_steps))
        if stopped and done:
            # the gradient is normalised over the whole batch: scale it to the entries that ran
            for param in self.drafter.parameters():
                if param.grad is not None:
                    param.grad.mul_(sum(counts) / done)
        torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), 1.0)
        self.optimizer.step()
        report.steps += 1
        report.tokens += tokens
        if not stopped:  # a part-step's loss and agreement are over a part of the batch: keep the last full ones
            report.last_loss = loss
            report.last_accuracy = accuracy
        self._unpushed_tokens += tokens
        return not stopped

    def _push(self, report: SpotReport) -> None:
        if self._unpushed_tokens == 0:
            return
        current = trainable_state(self.drafter)
        # .cpu(): the wire and the aggregator take CPU tensors (a no-op for a worker on the CPU)
        delta = {name: (current[name] - self._anchor[name]).cpu() for name in current}
        try:
            self.push(delta, self._unpushed_tokens)
        except RpcError as exc:
            if exc.code not in AGGREGATOR_AWAY:
                raise
            report.failed_pushes += 1  # the aggregator is away (a restarting drafter service): keep the work
            log.warning("drafter delta push failed, kept for the next push: %s", exc)
            return
        self._anchor = current
        self._unpushed_tokens = 0
        report.pushes += 1
