"""CUDA graphs of the engine's decode and tree-verification forwards.

On a GPU a small-batch decode step is launch-bound: a few hundred tiny kernels whose CPU-side launch
cost exceeds their run time. Replaying a captured graph launches them all at once. Graphs need static
shapes and addresses, so :class:`GraphedForward` keeps, per (padded batch, tokens per row), static input
buffers and one graph captured from them:

* **decode** graphs (one token per row) for every capture batch size up to the engine's ``max_running``;
* **verify** graphs (``num_verify`` tokens per row under a tree mask) for every strategy of the tuner and
  every capture batch size up to its ``sd_batch_threshold`` (above it SD is off).

A call pads its batch up to the next capture size; padded rows decode token 0 at position 0 in the free
cache slots past the running batch (running requests always occupy slots ``0..n-1``, so those slots hold
nothing live; they are overwritten by the next prefill). Attention reads the whole cache under the mask
(``key_len`` = the cache length), which keeps the shape static. All graphs are captured at construction,
largest first, from one shared memory pool, as vLLM does; outputs are views of static buffers, valid until
the next call. Weights are reloaded in place (``copy_``), so graphs stay valid across policy updates.

Without CUDA the same static-shape path runs eagerly (``capture=False``): nothing is captured, but the
padding, buffer and dispatch logic is what the tests exercise on CPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence

import torch

from tlt.models.kv_cache import StaticKVCache
from tlt.models.transformer import CausalLM, ForwardOutput


def capture_batch_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture up to ``max_batch``: 1, 2, 4, then every multiple of 8, then ``max_batch``
    (vLLM's capture sizes); a batch pads up to the next of these."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


class _StaticCall:
    """Static inputs of one (batch, width) shape and its forward: captured as a CUDA graph, or run eagerly."""

    def __init__(self, forward: Callable[..., ForwardOutput], cache: StaticKVCache, batch: int, width: int,
                 hidden_layers: tuple[int, ...], device: torch.device,
                 pool: tuple[int, int] | None, capture: bool) -> None:
        self.input_ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.cache_lens = torch.zeros(batch, dtype=torch.long, device=device)
        self._eye = torch.eye(width, dtype=torch.bool, device=device)
        self.block_mask = self._eye.expand(batch, -1, -1).clone() if width > 1 else None

        def run() -> ForwardOutput:
            return forward(self.input_ids, self.positions, cache=cache, slot_offset=0, cache_lens=self.cache_lens,
                           block_mask=self.block_mask, hidden_layers=hidden_layers, key_len=cache.max_len)

        self._run = run
        self._graph: torch.cuda.CUDAGraph | None = None
        self._output: ForwardOutput | None = None
        if capture:
            # Warm-up on a side stream first (lazy initialisation must not be captured); it writes K/V only
            # into slots 0..batch-1 at positions 0..width-1, which hold nothing before the first request.
            # Inference mode: no autograd state is recorded into the graph or kept alive by its outputs.
            with torch.inference_mode():
                stream = torch.cuda.Stream(device=device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        run()
                torch.cuda.current_stream(device).wait_stream(stream)
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph, pool=pool):
                    self._output = run()

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured graph (None when running eagerly)."""
        return self._graph

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                 block_mask: torch.Tensor | None) -> ForwardOutput:
        b = input_ids.shape[0]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.cache_lens[:b].copy_(cache_lens)
        # Padded rows: token 0 at position 0 of their (free) slot, each query seeing only itself.
        self.input_ids[b:].zero_()
        self.positions[b:].zero_()
        self.cache_lens[b:].zero_()
        if self.block_mask is not None:
            self.block_mask[:b].copy_(block_mask)
            self.block_mask[b:].copy_(self._eye)
        if self._graph is not None:
            self._graph.replay()
            out = self._output
        else:
            out = self._run()
        logits = out.logits[:b] if out.logits is not None else None
        return ForwardOutput(logits, {j: h[:b] for j, h in out.hidden.items()})


class GraphedForward:
    """A drop-in for ``CausalLM.forward`` in the engine's decode and verification calls that replays
    static-shape graphs; any call it has no graph for (another cache, a slot offset, a wider block, a
    larger batch) runs ``model.forward`` eagerly and is counted in :attr:`eager_calls`.

    Args:
        model: the target model.
        cache: the engine's KV cache (graphs are bound to its buffers).
        hidden_layers: the aux layers every call captures (the drafter's; empty without SD).
        max_decode_batch: largest decode batch (the engine's ``max_running``).
        verify_widths: tokens per row of each verification shape (the strategies' ``num_verify``).
        max_verify_batch: largest batch that verifies (the tuner's ``sd_batch_threshold``, capped).
        capture: capture CUDA graphs (needs ``model`` on a CUDA device); False runs the same static
            shapes eagerly.
    """

    def __init__(self, model: CausalLM, cache: StaticKVCache, hidden_layers: Sequence[int], max_decode_batch: int,
                 verify_widths: Iterable[int] = (), max_verify_batch: int = 0, capture: bool = True) -> None:
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {model.device}")
        self.model = model
        self.cache = cache
        self.hidden_layers = tuple(hidden_layers)
        max_decode_batch = min(max_decode_batch, cache.num_slots)
        max_verify_batch = min(max_verify_batch, max_decode_batch)
        shapes = [(b, 1) for b in capture_batch_sizes(max_decode_batch)]
        if max_verify_batch >= 1:
            shapes += [(b, w) for w in sorted(set(verify_widths)) for b in capture_batch_sizes(max_verify_batch)]
        pool = torch.cuda.graph_pool_handle() if capture else None
        self._calls: dict[int, dict[int, _StaticCall]] = {}
        # Largest first, so the smaller graphs reuse the pool memory of the larger ones.
        for batch, width in sorted(shapes, key=lambda s: -s[0] * s[1]):
            call = _StaticCall(model.forward, cache, batch, width, self.hidden_layers, model.device, pool, capture)
            self._calls.setdefault(width, {})[batch] = call
        self._sizes = {w: sorted(calls) for w, calls in self._calls.items()}
        self.graph_calls = 0
        self.eager_calls = 0

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, tokens per row) with a static call, sorted."""
        return sorted((b, w) for w, calls in self._calls.items() for b in calls)

    def graphs(self) -> list[torch.cuda.CUDAGraph]:
        """The captured CUDA graphs (empty when running eagerly)."""
        return [c.graph for calls in self._calls.values() for c in calls.values() if c.graph is not None]

    def _static_call(self, batch: int, width: int) -> _StaticCall | None:
        sizes = self._sizes.get(width)
        if not sizes:
            return None
        i = bisect.bisect_left(sizes, batch)
        return self._calls[width][sizes[i]] if i < len(sizes) else None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                 cache: StaticKVCache | None = None, slot_offset: int = 0, cache_lens: torch.Tensor | None = None,
                 block_mask: torch.Tensor | None = None, hidden_layers: Sequence[int] = (),
                 **kwargs: object) -> ForwardOutput:
        b, t = input_ids.shape
        call = None
        if (cache is self.cache and slot_offset == 0 and cache_lens is not None and not kwargs.keys() - {"key_len"}
                and tuple(hidden_layers) == self.hidden_layers and (block_mask is not None or t == 1)):
            call = self._static_call(b, t)
        if call is None:
            self.eager_calls += 1
            return self.model.forward(input_ids, positions, cache=cache, slot_offset=slot_offset,
                                      cache_lens=cache_lens, block_mask=block_mask, hidden_layers=hidden_layers,
                                      **kwargs)
        if positions is None:
            positions = cache_lens[:, None] + torch.arange(t, device=input_ids.device)[None, :]
        self.graph_calls += 1
        return call(input_ids, positions, cache_lens, block_mask)
