"""Continuous-batching generation engine over our model and its slotted static KV cache.

Each :meth:`RolloutEngine.step` admits queued requests into free slots and prefills them, decodes
one token for every request that was already running, samples, and retires finished requests.
Running requests always occupy slots ``0..n-1`` (a finished request's slot is refilled by moving the
last one into it), so every forward reads the cache as a contiguous view.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from tlt.errors import InvalidRequestError
from tlt.models.drafter import Eagle3Drafter
from tlt.models.transformer import CausalLM
from tlt.rollout.cuda_graphs import GraphedForward
from tlt.rollout.sampling import SamplingParams, UniformStream, sample_tokens
from tlt.rollout.speculative import SpecDecodeStats, SpecState, SpeculativeDecoder
from tlt.rollout.tuner import BegMabTuner, SpecStrategy, TunerConfig

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class RequestOutput:
    """A finished request: generated ids, their log-probs, and why it stopped ('stop' or 'length')."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass(frozen=True)
class ProgressSnapshot:
    """Engine progress, safe to read from any thread at any time."""

    running: int
    queued: int
    finished: int
    generated_tokens: int
    tokens_per_s: float
    timestamp: float


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    uniforms: UniformStream
    stop_ids: frozenset[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cache_len: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    spec: SpecState | None = None

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt_ids, self.token_ids, self.logprobs, self.finish_reason or "")


class DecodeRate:
    """Tokens per second over the engine steps of the last :attr:`WINDOW_S` seconds (not thread-safe: the
    engine calls it under its own lock)."""

    WINDOW_S = 5.0

    def __init__(self) -> None:
        self._steps: deque[tuple[float, int]] = deque()  # (monotonic time, tokens) of each step

    def record(self, tokens: int) -> None:
        self._steps.append((time.monotonic(), tokens))

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        while self._steps and now - self._steps[0][0] > self.WINDOW_S:
            self._steps.popleft()
        if len(self._steps) < 2 or self._steps[-1][0] <= self._steps[0][0]:
            return 0.0
        return sum(n for _, n in itertools.islice(self._steps, 1, None)) / (self._steps[-1][0] - self._steps[0][0])


class StepLoop:
    """``run`` and ``generate`` for an engine that has ``submit``, ``step`` and ``has_work`` (the native
    engine and the vLLM backend's)."""

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> str:
        raise NotImplementedError

    def step(self) -> list[RequestOutput]:
        raise NotImplementedError

    def has_work(self) -> bool:
        raise NotImplementedError

    def run(self, on_finish: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Step until no request is queued or running; returns outputs in finishing order."""
        outputs: list[RequestOutput] = []
        while self.has_work():
            for out in self.step():
                outputs.append(out)
                if on_finish is not None:
                    on_finish(out)
        return outputs

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[RequestOutput]:
        """Generate for all prompts; outputs are returned in prompt order."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise InvalidRequestError(f"got {len(per_prompt)} sampling params for {len(prompts)} prompts")
        ids = [self.submit(p, sp) for p, sp in zip(prompts, per_prompt)]
        by_id = {out.request_id: out for out in self.run()}
        return [by_id[i] for i in ids]


class _FixedStrategy:
    """A stand-in tuner that always picks ``strategy`` (None: plain decoding) and learns nothing."""

    def __init__(self, strategy: SpecStrategy | None, config: TunerConfig) -> None:
        self.strategy, self.config = strategy, config

    def choose(self, batch_size: int) -> SpecStrategy | None:
        return self.strategy

    def record(self, *args: object) -> None:
        pass

    def record_plain(self, *args: object) -> None:
        pass


class RolloutEngine(StepLoop):
    """Generates completions for many requests with continuous batching.

    Args:
        model: the target model (its dtype/device are used for the cache).
        max_running: number of cache slots, i.e. the maximum decode batch.
        max_seq_len: prompt + completion token limit per request (defaults to the model's context,
            capped at 4096).
        max_prefill_tokens: token budget of one prefill batch (at least one request is always admitted).
        seed: seeds the uniform stream of requests that bring no seed of their own.
        drafter: an EAGLE-3 drafter for speculative decoding (None: plain decoding only).
        tuner: decides per step whether to speculate and with which strategy (default: BEG-MAB
            with default settings when a drafter is given).
        compile: ``torch.compile`` the decode and tree-verification forwards, the drafter's catch-up and
            the tree expansion (dynamic shapes, inductor; vLLM's CPU backend compiles its model the same way).
            Prefill stays eager. Call :meth:`warm_up` before serving, so that graphs are compiled then and not
            mid-rollout.
        cuda_graphs: replay CUDA graphs of the decode and verification forwards (see
            :mod:`tlt.rollout.cuda_graphs`), captured here. None (default): on when the model is on a CUDA
            device and ``compile`` is off. True on a CPU model runs the same static shapes eagerly (for tests).
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        max_running: int = 64,
        max_seq_len: int | None = None,
        max_prefill_tokens: int = 8192,
        eos_token_ids: Iterable[int] | None = None,
        seed: int = 0,
        drafter: Eagle3Drafter | None = None,
        tuner: BegMabTuner | None = None,
        compile: bool = False,
        cuda_graphs: bool | None = None,
    ) -> None:
        if max_running < 1:
            raise InvalidRequestError(f"engine.max_running must be >= 1, got {max_running}")
        if drafter is not None and tuner is None:
            tuner = BegMabTuner(TunerConfig())
        self.tuner = tuner if drafter is not None else None
        # Iterations are counted per batch-size bucket (a metric); plain engines use the default buckets.
        self.bucket_bounds: list[int] = list((self.tuner.config if self.tuner else TunerConfig()).bucket_bounds)
        # Room past the longest sequence for a verification tree / the drafter's scratch nodes.
        strategies = self.tuner.config.strategies if self.tuner else []
        cache_headroom = max((st.num_verify + st.depth for st in strategies), default=0)
        draft_headroom = max((st.depth * st.topk for st in strategies), default=0)
        context = model.rope_cos.shape[0]
        self.max_seq_len = min(max_seq_len or min(context, 4096), context - cache_headroom)
        if self.max_seq_len < 2:
            raise InvalidRequestError(f"engine.max_seq_len must be >= 2, got {self.max_seq_len}")
        self.model = model
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = frozenset(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.cache = model.new_cache(max_running, self.max_seq_len + cache_headroom)
        if cuda_graphs is None:
            cuda_graphs = model.device.type == "cuda" and not compile
        if cuda_graphs and compile:
            raise InvalidRequestError("engine: choose one of compile and cuda_graphs, not both")
        self.graphs: GraphedForward | None = None
        if cuda_graphs:
            self.graphs = GraphedForward(
                model, self.cache, drafter.config.aux_layer_ids if drafter is not None else (), max_running,
                verify_widths=[st.num_verify for st in strategies],
                max_verify_batch=self.tuner.config.sd_batch_threshold if self.tuner else 0,
                capture=model.device.type == "cuda")
        self._target_forward = (self.graphs if self.graphs is not None else
                                torch.compile(model.forward, dynamic=True) if compile else model.forward)
        self.spec = None
        if drafter is not None:
            self.spec = SpeculativeDecoder(model, drafter, self.cache, max_running,
                                           self.max_seq_len + cache_headroom + draft_headroom,
                                           target_forward=self._target_forward, compile=compile,
                                           num_strategies=len(strategies))
        self.stats = self.spec.stats if self.spec else SpecDecodeStats()
        self._seed_rng = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._queue: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._finished_count = 0
        self._generated = 0
        self._rate = DecodeRate()

    # ---- submission -------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None) -> str:
        """Queue a request; validates it at once and returns its id."""
        params = params or SamplingParams()
        prompt = self.validate(prompt_ids)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (), generator=self._seed_rng))
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        seq = _Sequence(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_ids=prompt,
            params=params,
            uniforms=UniformStream(seed),
            stop_ids=frozenset(stop),
            spec=SpecState() if self.spec else None,
        )
        with self._lock:
            self._queue.append(seq)
        return seq.request_id

    def validate(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt as a list of ints; raises InvalidRequestError when the engine cannot take it."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidRequestError("prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt holds token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.max_seq_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} tokens but max_seq_len is {self.max_seq_len} (prompt + at least one "
                "new token); shorten the prompt or raise max_seq_len"
            )
        return prompt

    def abort_all(self) -> list[str]:
        """Drop every queued and running request (cache slots are positional, so they are simply reused);
        returns the dropped ids."""
        with self._lock:
            ids = [s.request_id for s in (*self._running, *self._queue)]
            self._running.clear()
            self._queue.clear()
        return ids

    # ---- state ------------------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queue or self._running)

    def progress(self) -> ProgressSnapshot:
        """Counts of running/queued/finished requests and recent decode throughput."""
        with self._lock:
            snapshot = (len(self._running), len(self._queue), self._finished_count, self._generated)
            rate = self._rate.tokens_per_s()
        return ProgressSnapshot(*snapshot, tokens_per_s=rate, timestamp=time.time())

    def warm_up(self, prompt_ids: Sequence[int], max_new_tokens: int = 8) -> None:
        """Run each kind of engine step on throwaway requests (plain decoding and every SD strategy, at batch
        1 and 2: a compiled graph of batch 1 and one of any other size), so that a compiled engine compiles
        now rather than mid-rollout. The bandit and the SD and progress counters are left as they were."""
        if self.has_work():
            raise RuntimeError("warm_up needs an idle engine: call it before submitting requests")
        tuner, stats = self.tuner, copy.deepcopy(self.stats)
        counters = (self._finished_count, self._generated)
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, seed=0)
        try:
            for strategy in [None, *(tuner.config.strategies if tuner else [])]:
                if tuner is not None:
                    self.tuner = _FixedStrategy(strategy, tuner.config)
                for batch in (1, 2):
                    self.generate([prompt_ids] * batch, params)
            if self.spec is not None:
                self.spec.warm_up_drafter()
        finally:
            self.tuner = tuner
            self.stats = stats
            if self.spec:
                self.spec.stats = stats
            self._finished_count, self._generated = counters
            self._rate = DecodeRate()

    # ---- stepping ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling iteration; returns the requests that finished in it."""
        decoding = list(self._running)
        admitted = self._admit()
        new_tokens = 0
        if decoding:
            strategy = self.tuner.choose(len(decoding)) if self.tuner else None
            bucket = self.bucket_bounds[bisect.bisect_right(self.bucket_bounds, len(decoding)) - 1]
            start = time.perf_counter()
            if strategy is None:
                self._decode(decoding)
                new_tokens += len(decoding)
                seconds = time.perf_counter() - start
                self.stats.count_iteration(False, seconds, bucket)
                if self.tuner:
                    self.tuner.record_plain(len(decoding), len(decoding), seconds)
            else:
                emitted, catch_up_s, switch_over = self._speculate(decoding, strategy)
                new_tokens += emitted
                seconds = time.perf_counter() - start
                self.stats.count_iteration(True, seconds, bucket)
                # A switch-over's one-time drafter prefill is not a property of the strategy.
                self.tuner.record(len(decoding), strategy, emitted, seconds - catch_up_s if switch_over else seconds)
        if admitted:
            self._prefill(admitted, slot_offset=len(decoding))
            new_tokens += len(admitted)
        return self._retire(new_tokens)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        budget = self.max_prefill_tokens
        with self._lock:
            while self._queue and len(self._running) < self.max_running:
                cost = len(self._queue[0].prompt_ids)
                if admitted and cost > budget:
                    break
                seq = self._queue.popleft()
                budget -= cost
                admitted.append(seq)
                self._running.append(seq)
        return admitted

    def _prefill(self, seqs: list[_Sequence], slot_offset: int) -> None:
        lengths = [len(s.prompt_ids) for s in seqs]
        width = max(lengths)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s.prompt_ids)] = torch.tensor(s.prompt_ids)
        out = self.model(
            ids.to(self.model.device),
            cache=self.cache,
            slot_offset=slot_offset,
            cache_lens=torch.zeros(len(seqs), dtype=torch.long, device=self.model.device),
            last_index=torch.tensor(lengths, device=self.model.device) - 1,
            hidden_layers=self.spec.aux_layers if self.spec else (),
        )
        if self.spec:
            self.spec.capture([s.spec for s in seqs], out.hidden, lengths)
        for s, n in zip(seqs, lengths):
            s.cache_len = n
        self._append_samples(seqs, out.logits)

    def _decode(self, seqs: list[_Sequence]) -> None:
        device = self.model.device
        ids = torch.tensor([[s.last_token] for s in seqs], device=device)
        cache_lens = torch.tensor([s.cache_len for s in seqs], device=device)
        out = self._target_forward(ids, cache=self.cache, slot_offset=0, cache_lens=cache_lens,
                                   key_len=max(s.cache_len for s in seqs) + 1,
                                   hidden_layers=self.spec.aux_layers if self.spec else ())
        if self.spec:
            self.spec.capture([s.spec for s in seqs], out.hidden, [1] * len(seqs))
        for s in seqs:
            s.cache_len += 1
        self._append_samples(seqs, out.logits[:, -1])

    def _speculate(self, seqs: list[_Sequence], strategy) -> tuple[int, float, bool]:
        """One speculative iteration; returns (tokens emitted, catch-up seconds, was a switch-over)."""
        states = [s.spec for s in seqs]
        switch_over = any(s.cache_len - st.drafter_len > strategy.depth + 1 for s, st in zip(seqs, states))
        results, catch_up_s = self.spec.step(seqs, states, strategy)
        emitted = 0
        for s, res in zip(seqs, results):
            for tok, lp in zip(res.tokens, res.logprobs):
                emitted += 1
                if self.append_token(s, tok, lp):
                    break
        return emitted, catch_up_s, switch_over

    def _append_samples(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        tokens, logprobs = sample_tokens(logits, [s.params for s in seqs], [s.uniforms for s in seqs])
        for s, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist()):
            self.append_token(s, tok, lp)

    def append_token(self, seq: _Sequence, token: int, logprob: float) -> bool:
        """Record a generated token and decide whether the sequence is finished; True if it is."""
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        if token in seq.stop_ids:
            seq.finish_reason = FINISH_STOP
        elif (len(seq.token_ids) >= seq.params.max_new_tokens
              or len(seq.prompt_ids) + len(seq.token_ids) >= self.max_seq_len):
            seq.finish_reason = FINISH_LENGTH
        return seq.finish_reason is not None

    def _retire(self, new_tokens: int) -> list[RequestOutput]:
        finished: list[RequestOutput] = []
        with self._lock:
            slot = 0
            while slot < len(self._running):
                seq = self._running[slot]
                if seq.finish_reason is None:
                    slot += 1
                    continue
                finished.append(seq.output())
                last = self._running.pop()
                if last is not seq:
                    self.cache.move_slot(len(self._running), slot, last.cache_len)
                    if self.spec:
                        self.spec.drafter_cache.move_slot(len(self._running), slot, last.spec.drafter_len)
                    self._running[slot] = last
            self._finished_count += len(finished)
            self._generated += new_tokens
            self._rate.record(new_tokens)
        return finished
