"""Static, preallocated key/value cache organised in slots (one slot per running sequence)."""

from __future__ import annotations

import torch

from tlt.models.config import ModelConfig


class StaticKVCache:
    """Keys and values for ``num_slots`` sequences of up to ``max_len`` tokens, for every layer.

    Layout per layer: ``[num_slots, num_kv_heads, max_len, head_dim]``, so the rows of a batch that
    occupy consecutive slots are a view (no gather) and attention can read ``[:, :, :length]``.
    ``max_len`` includes headroom beyond the longest sequence so that a block of speculative tokens
    can be written past the end before being accepted or discarded.
    """

    def __init__(
        self, config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype, device: str | torch.device = "cpu"
    ) -> None:
        shape = (num_slots, config.num_key_value_heads, max_len, config.head_dim)
        self.num_slots = num_slots
        self.max_len = max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst``."""
        if src == dst or length <= 0:
            return
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length].copy_(k[src, :, :length])
            v[dst, :, :length].copy_(v[src, :, :length])

    def copy_positions(self, slots: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy cached position ``src[i]`` to ``dst[i]`` within slot ``slots[i]``, for all ``i`` at once (keeps
        accepted draft tokens). Sources are read before any destination is written."""
        for k, v in zip(self.keys, self.values):
            k[slots, :, dst] = k[slots, :, src]
            v[slots, :, dst] = v[slots, :, src]
