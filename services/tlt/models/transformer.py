"""Our own forward pass for Llama/Qwen2-family causal LMs over a slotted static KV cache.

One forward call processes a block of ``T`` new tokens for each of ``B`` sequences that occupy the
consecutive cache slots ``slot_offset .. slot_offset+B-1``. Row ``b`` already has ``cache_lens[b]``
tokens cached; its new tokens are written at cache indices ``cache_lens[b] + i`` while their rotary
positions come from ``positions`` (they differ for tree verification, where siblings share a
position). By default new tokens attend causally; an explicit ``block_mask[b, i, t]`` (may token
``i`` see new token ``t``) expresses a draft tree. Rows may be ragged: pad on the right, the causal
rule keeps padding invisible to valid tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tlt.models.config import ModelConfig
from tlt.models.kv_cache import StaticKVCache
from tlt.models.rope import apply_rotary, rotary_table


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as the HF reference does."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


@dataclass
class ForwardOutput:
    """Logits ([B, T, V], or [B, V] when ``last_index`` was given) and captured hidden states."""

    logits: torch.Tensor | None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer with fused QKV and gate/up projections."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.input_norm = nn.Parameter(torch.ones(h))
        self.post_attention_norm = nn.Parameter(torch.ones(h))
        self.qkv_weight = nn.Parameter(torch.empty(config.q_size + 2 * config.kv_size, h))
        self.qkv_bias = nn.Parameter(torch.zeros(config.q_size + 2 * config.kv_size)) if config.attention_bias else None
        self.o_weight = nn.Parameter(torch.empty(h, config.q_size))
        self.gate_up_weight = nn.Parameter(torch.empty(2 * config.intermediate_size, h))
        self.down_weight = nn.Parameter(torch.empty(h, config.intermediate_size))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        write_index: tuple[torch.Tensor, torch.Tensor] | None,
        key_len: int,
        slots: slice,
    ) -> torch.Tensor:
        cfg = self.config
        b, t, _ = x.shape
        h = rms_norm(x, self.input_norm, cfg.rms_norm_eps)
        qkv = F.linear(h, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
        q = apply_rotary(q.view(b, t, -1, cfg.head_dim).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(b, t, -1, cfg.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, -1, cfg.head_dim).transpose(1, 2)
        if cache is not None:
            k_cache, v_cache = cache
            rows, cols = write_index
            # Advanced indices on dims 0 and 2 put them first: the target is [B, T, kv_heads, D].
            k_cache[rows, :, cols] = k.transpose(1, 2)
            v_cache[rows, :, cols] = v.transpose(1, 2)
            k = k_cache[slots, :, :key_len]
            v = v_cache[slots, :, :key_len]
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=True
        )
        x = x + F.linear(attn.transpose(1, 2).reshape(b, t, cfg.q_size), self.o_weight)
        h = rms_norm(x, self.post_attention_norm, cfg.rms_norm_eps)
        gate, up = F.linear(h, self.gate_up_weight).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down_weight)


class CausalLM(nn.Module):
    """A Llama/Qwen2 causal LM. Build with :func:`tlt.models.loader.load_model`."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head_weight = (
            None if config.tie_word_embeddings else nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        )
        cos, sin = rotary_table(config.rope, config.head_dim, max_positions or config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def lm_head(self) -> torch.Tensor:
        return self.embed if self.lm_head_weight is None else self.lm_head_weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_cache(self, num_slots: int, max_len: int) -> StaticKVCache:
        """Allocate a KV cache with this model's dtype and device."""
        if max_len > self.rope_cos.shape[0]:
            raise ValueError(f"max_len {max_len} exceeds the rotary table ({self.rope_cos.shape[0]} positions)")
        return StaticKVCache(self.config, num_slots, max_len, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        cache: StaticKVCache | None = None,
        slot_offset: int = 0,
        cache_lens: torch.Tensor | None = None,
        block_mask: torch.Tensor | None = None,
        last_index: torch.Tensor | None = None,
        hidden_layers: Sequence[int] = (),
        compute_logits: bool = True,
        key_len: int | None = None,
    ) -> ForwardOutput:
        """Run ``input_ids`` [B, T] through the model.

        ``hidden_layers`` uses the Hugging Face ``hidden_states`` indexing: ``j < L`` is the input to
        decoder layer ``j`` (0 = embeddings), ``j == L`` is the final normed output. This is also the
        EAGLE-3 "aux hidden state layer id" convention of vLLM. ``key_len`` (the longest row's cached plus new
        tokens) may be given by a caller that knows it, sparing a device sync (and a graph break when compiled).
        """
        b, t = input_ids.shape
        device = input_ids.device
        if cache_lens is None:
            cache_lens = torch.zeros(b, dtype=torch.long, device=device)
        if positions is None:
            positions = cache_lens[:, None] + torch.arange(t, device=device)[None, :]
        cos = self.rope_cos[positions].to(self.dtype).unsqueeze(1)
        sin = self.rope_sin[positions].to(self.dtype).unsqueeze(1)

        slots = slice(slot_offset, slot_offset + b)
        write_index = None
        if cache is not None:
            if key_len is None:
                key_len = int(cache_lens.max()) + t
            if key_len > cache.max_len:
                raise ValueError(f"sequence would reach {key_len} tokens, past the cache's {cache.max_len}")
            cols = cache_lens[:, None] + torch.arange(t, device=device)[None, :]
            rows = torch.arange(slot_offset, slot_offset + b, device=device)[:, None].expand(b, t)
            write_index = (rows, cols)
            mask = _attention_mask(cache_lens, t, key_len, block_mask)
        else:
            key_len = t
            mask = None if block_mask is None else block_mask.unsqueeze(1)

        wanted = set(hidden_layers)
        hidden: dict[int, torch.Tensor] = {}
        x = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            if i in wanted:
                hidden[i] = x
            layer_cache = (cache.keys[i], cache.values[i]) if cache is not None else None
            x = layer(x, cos, sin, mask, layer_cache, write_index, key_len, slots)
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        if self.config.num_hidden_layers in wanted:
            hidden[self.config.num_hidden_layers] = x
        if not compute_logits:
            return ForwardOutput(None, hidden)
        if last_index is not None:
            x = x[torch.arange(b, device=device), last_index]
        return ForwardOutput(F.linear(x, self.lm_head), hidden)


def _attention_mask(
    cache_lens: torch.Tensor, t: int, key_len: int, block_mask: torch.Tensor | None
) -> torch.Tensor:
    """Boolean [B, 1, T, key_len] mask: the cached prefix plus the allowed part of the new block."""
    device = cache_lens.device
    rel = torch.arange(key_len, device=device)[None, :] - cache_lens[:, None]  # [B, K]: index within block
    query = torch.arange(t, device=device)[None, :, None]
    if block_mask is None:
        return (rel[:, None, :] <= query).unsqueeze(1)
    in_block = (rel >= 0) & (rel < t)
    gathered = block_mask.gather(2, rel.clamp(0, t - 1)[:, None, :].expand(-1, t, -1))
    return ((rel < 0)[:, None, :] | (gathered & in_block[:, None, :])).unsqueeze(1)
