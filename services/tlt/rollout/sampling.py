"""Sampling parameters and batched, per-request-seeded token sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tlt.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. ``temperature == 0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
               and self.temperature >= 0, "temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens,
               "an integer >= 1")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or null")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "a list of token ids >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidRequestError(f"sampling.{name} must be {expected}, got {value!r}")


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Sampling distribution per row in fp32 after temperature, top-k and top-p (rows must not be greedy)."""
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
    probs = torch.softmax(logits.float() / temps[:, None], dim=-1)
    if all(p.top_k == 0 and p.top_p >= 1.0 for p in params):
        return probs
    vocab = probs.shape[-1]
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device)[:, None]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=logits.device)[:, None]
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly before each token
    keep = (ranks < top_k) & ((before < top_p) | (ranks == 0))
    sorted_probs = sorted_probs * keep
    out = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return out / out.sum(-1, keepdim=True)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per row from ``probs`` [B, V] using ``uniforms`` [B] in [0, 1)."""
    cdf = probs.cumsum(-1)
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


class UniformStream:
    """A request's uniforms in [0, 1), drawn in order from its own seeded generator.

    Every emitted token uses the next uniform of the stream, with or without speculation: speculative
    verification looks ahead (:meth:`peek`, one uniform per tree depth) and then consumes only as many as it
    emitted tokens, so the rest stay for the next tokens. The generator is read in blocks of :attr:`BLOCK` into
    a list of floats: one tensor call per block instead of several per token. (CPU generators give the same
    numbers drawn one at a time or ``n`` at once, which a test checks.)
    """

    BLOCK = 64
    __slots__ = ("_ahead", "_next", "generator")

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self._ahead: list[float] = []
        self._next = 0  # index in _ahead of the next unconsumed uniform

    def peek(self, n: int) -> list[float]:
        """The next ``n`` uniforms, not consumed."""
        end = self._next + n
        if end > len(self._ahead):
            self._ahead = self._ahead[self._next:]
            self._next, end = 0, n
            short = n - len(self._ahead)
            self._ahead += torch.rand(max(short, self.BLOCK), generator=self.generator).tolist()
        return self._ahead[self._next:end]

    def consume(self, n: int) -> None:
        """Mark the next ``n`` uniforms as used (they must have been peeked)."""
        if self._next + n > len(self._ahead):
            raise ValueError(f"consume({n}) passes the {len(self._ahead) - self._next} uniforms peeked")
        self._next += n

    def take(self) -> float:
        """The next uniform, consumed."""
        u = self.peek(1)[0]
        self._next += 1
        return u


def sample_tokens(
    logits: torch.Tensor, params: list[SamplingParams], streams: list[UniformStream]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (tokens [B], log-probs [B]).

    The log-prob is of the sampled token under the temperature-scaled full distribution (the raw
    distribution for greedy rows), which is what a GRPO importance ratio needs. Each row draws its
    uniform from its own stream, so a request's samples do not depend on its batch neighbours.
    """
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if len(sampled) == len(params):  # the usual case: no row gathering (small ops dominate at decode sizes)
        tokens = _sample_rows(logits, params, streams)
    else:
        tokens = logits.float().argmax(-1)  # fp32 argmax is ~3x faster on CPU
        if sampled:
            tokens[sampled] = _sample_rows(logits[sampled], [params[i] for i in sampled], [streams[i] for i in sampled])
    return tokens, token_logprobs(logits, params, tokens[:, None]).squeeze(-1)


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], streams: list[UniformStream]) -> torch.Tensor:
    uniforms = torch.tensor([s.take() for s in streams], device=logits.device)
    return sample_from_probs(processed_probs(logits, params), uniforms)


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``tokens`` [B, T] under row ``b``'s temperature-scaled distribution (the raw one for greedy
    rows), given ``logits`` [B, V] (shared by the row's tokens) or [B, T, V] (one distribution per token)."""
    temps = torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32, device=logits.device)
    scaled = logits.float() / temps.view(-1, *[1] * (logits.dim() - 1))
    logprobs = torch.log_softmax(scaled, dim=-1)
    if logprobs.dim() == 2:
        logprobs = logprobs[:, None, :].expand(-1, tokens.shape[1], -1)
    return logprobs.gather(-1, tokens[:, :, None]).squeeze(-1)
