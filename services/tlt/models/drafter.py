"""EAGLE-3 style drafter: one decoder layer over fused low/mid/high target hidden states.

Data flow (the vLLM ``Eagle3LlamaForCausalLM`` layout, so our checkpoints load there):

* ``fc`` fuses the concatenated target hidden states of three layers ``[.., 3*H_t] -> [.., H]``. It is
  applied to target features only; later draft steps feed back the drafter's own output instead.
* The single "midlayer" normalises the token embedding (``input_norm``) and the incoming hidden state
  (``hidden_norm``) separately, concatenates them (width ``2H``) as the attention input, and keeps the
  incoming hidden state as the residual. Then the usual post-attention norm + SwiGLU MLP.
* ``norm`` + the drafter's own ``lm_head`` over a draft vocabulary of ``draft_vocab_size`` ids, mapped
  to target ids by ``d2t`` offsets (``target = draft + d2t[draft]``); ``t2d`` marks target ids that
  exist in the draft vocabulary. The token embedding is the target's (frozen, not stored).

Pairing convention (as vLLM 0.32 ``llm_base_proposer``): drafter entry ``j`` is
``(f_j, embed(x_{j+1}))`` at rotary position ``j`` (the feature's position), and its logits predict
``x_{j+2}``. Draft step ``k`` runs at position ``p + k`` on the previous step's pre-norm output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlt.errors import ModelLoadError
from tlt.models.config import ModelConfig
from tlt.models.kv_cache import StaticKVCache
from tlt.models.rope import apply_rotary, rotary_table
from tlt.models.transformer import rms_norm


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """vLLM/SGLang default EAGLE-3 aux layers ``(2, L//2, L-3)``; the last three inputs when those
    would not be three distinct layers (L < 7).

    Id ``j`` is the *input* of target layer ``j`` (HF ``hidden_states[j]``, the un-normed residual
    stream), so ids range over ``0..L-1``: vLLM's id ``L`` would be the un-normed final output, which
    HF's ``hidden_states[L]`` (post-norm) is not.
    """
    if num_layers >= 7:
        return (2, num_layers // 2, num_layers - 3)
    if num_layers < 3:
        raise ModelLoadError(f"an EAGLE-3 drafter needs a target with >= 3 layers, got {num_layers}")
    return (num_layers - 3, num_layers - 2, num_layers - 1)


@dataclass(frozen=True)
class DrafterConfig:
    """Shape of an EAGLE-3 drafter. ``attn`` describes its one layer (a 1-layer ModelConfig)."""

    attn: ModelConfig
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: tuple[int, ...]

    @property
    def hidden_size(self) -> int:
        return self.attn.hidden_size

    @property
    def target_vocab_size(self) -> int:
        return self.attn.vocab_size

    @classmethod
    def from_target(cls, target: ModelConfig, aux_layer_ids: tuple[int, ...] | None = None,
                    draft_vocab_size: int | None = None) -> DrafterConfig:
        """A drafter as wide as the target (as EAGLE-3 drafters are), with one layer."""
        aux = tuple(aux_layer_ids or default_aux_layers(target.num_hidden_layers))
        bad = [j for j in aux if not 0 <= j < target.num_hidden_layers]
        if len(aux) != 3 or bad or list(aux) != sorted(set(aux)):
            raise ModelLoadError(
                f"aux_layer_ids must be 3 distinct ascending ids in [0, {target.num_hidden_layers - 1}], got {aux}"
            )
        return cls(
            attn=replace(target, num_hidden_layers=1, attention_bias=False, tie_word_embeddings=False),
            draft_vocab_size=draft_vocab_size or target.vocab_size,
            target_hidden_size=target.hidden_size,
            aux_layer_ids=aux,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json for vLLM/SGLang (``LlamaForCausalLMEagle3``)."""
        a = self.attn
        rope: dict[str, Any] = {"rope_type": a.rope.rope_type, "rope_theta": a.rope.theta}
        if a.rope.rope_type != "default":
            rope.update(factor=a.rope.factor, low_freq_factor=a.rope.low_freq_factor,
                        high_freq_factor=a.rope.high_freq_factor,
                        original_max_position_embeddings=a.rope.original_max_position_embeddings)
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": a.hidden_size,
            "intermediate_size": a.intermediate_size,
            "num_hidden_layers": 1,
            "num_attention_heads": a.num_attention_heads,
            "num_key_value_heads": a.num_key_value_heads,
            "head_dim": a.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": a.rms_norm_eps,
            "max_position_embeddings": a.max_position_embeddings,
            "rope_theta": a.rope.theta,
            "rope_scaling": None if a.rope.rope_type == "default" else rope,
            "vocab_size": a.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                             "use_aux_hidden_state": True},
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> DrafterConfig:
        archs = raw.get("architectures") or []
        if "LlamaForCausalLMEagle3" not in archs:
            raise ModelLoadError(f"{source}: architectures must include 'LlamaForCausalLMEagle3', got {archs}")
        aux = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if not aux or len(aux) != 3:
            raise ModelLoadError(f"{source}: eagle_config.eagle_aux_hidden_state_layer_ids must list 3 layer ids")
        attn = ModelConfig.from_hf_dict({**raw, "tie_word_embeddings": False}, source)
        if attn.num_hidden_layers != 1:
            raise ModelLoadError(f"{source}: num_hidden_layers must be 1 for an EAGLE-3 drafter")
        return cls(attn=attn, draft_vocab_size=int(raw.get("draft_vocab_size") or attn.vocab_size),
                   target_hidden_size=int(raw.get("target_hidden_size") or attn.hidden_size),
                   aux_layer_ids=tuple(int(j) for j in aux))


@dataclass
class DrafterOutput:
    """Draft logits over the draft vocabulary and the pre-norm hidden state fed to the next step."""

    logits: torch.Tensor
    hidden: torch.Tensor


class Eagle3Drafter(nn.Module):
    """The drafter's weights and forward. ``embed`` is the target's embedding matrix (not owned)."""

    def __init__(self, config: DrafterConfig, embed: torch.Tensor, max_positions: int | None = None) -> None:
        super().__init__()
        a = config.attn
        h = a.hidden_size
        self.config = config
        self.fc = nn.Parameter(torch.empty(h, 3 * config.target_hidden_size))
        self.input_norm = nn.Parameter(torch.ones(h))
        self.hidden_norm = nn.Parameter(torch.ones(h))
        self.qkv_weight = nn.Parameter(torch.empty(a.q_size + 2 * a.kv_size, 2 * h))
        self.o_weight = nn.Parameter(torch.empty(h, a.q_size))
        self.post_attention_norm = nn.Parameter(torch.ones(h))
        self.gate_up_weight = nn.Parameter(torch.empty(2 * a.intermediate_size, h))
        self.down_weight = nn.Parameter(torch.empty(h, a.intermediate_size))
        self.norm = nn.Parameter(torch.ones(h))
        self.lm_head = nn.Parameter(torch.empty(config.draft_vocab_size, h))
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(a.vocab_size, dtype=torch.bool))
        self.bind_embedding(embed)
        cos, sin = rotary_table(a.rope, a.head_dim, max_positions or a.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def bind_embedding(self, embed: torch.Tensor) -> None:
        """Use ``embed`` (the target's embedding matrix) for draft tokens.

        Kept outside the module's parameters on purpose: it is owned (and trained) by the policy, so
        it is neither optimised nor saved with the drafter.
        """
        object.__setattr__(self, "_target_embed", embed)

    def copy_for(self, target) -> Eagle3Drafter:
        """A copy of this drafter's weights (in fp32) bound to ``target``'s embedding."""
        copy = Eagle3Drafter(self.config, target.embed, max_positions=target.rope_cos.shape[0])
        copy.load_state_dict(self.state_dict())
        return copy

    @property
    def embed(self) -> torch.Tensor:
        return self._target_embed

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) matrices, unit norms) for training from scratch."""
        with torch.no_grad():
            for p in (self.fc, self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight, self.lm_head):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            for p in (self.input_norm, self.hidden_norm, self.post_attention_norm, self.norm):
                p.fill_(1.0)

    def set_vocab_map(self, draft_to_target: torch.Tensor) -> None:
        """Install a reduced draft vocabulary given the target id of every draft id (ascending)."""
        ids = draft_to_target.to(torch.long)
        self.d2t.copy_(ids - torch.arange(len(ids)))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_to_target(self) -> torch.Tensor:
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """Target features ``[.., 3*H_t]`` -> drafter hidden ``[.., H]``."""
        return F.linear(aux_hidden.to(self.fc.dtype), self.fc)

    def qkv(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary-embedded q, k, v ``[B, heads, T, D]`` for tokens ``[B, T]`` with hidden ``[B, T, H]``."""
        a = self.config.attn
        b, t = tokens.shape
        emb = rms_norm(F.embedding(tokens, self.embed).to(hidden.dtype), self.input_norm, a.rms_norm_eps)
        x = torch.cat([emb, rms_norm(hidden, self.hidden_norm, a.rms_norm_eps)], dim=-1)
        q, k, v = F.linear(x, self.qkv_weight).split((a.q_size, a.kv_size, a.kv_size), dim=-1)
        cos = self.rope_cos[positions].to(hidden.dtype).unsqueeze(1)
        sin = self.rope_sin[positions].to(hidden.dtype).unsqueeze(1)
        q = apply_rotary(q.view(b, t, -1, a.head_dim).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(b, t, -1, a.head_dim).transpose(1, 2), cos, sin)
        return q, k, v.view(b, t, -1, a.head_dim).transpose(1, 2)

    def finish(self, attn: torch.Tensor, residual: torch.Tensor) -> DrafterOutput:
        """Attention output ``[B, heads, T, D]`` + residual -> logits and the pre-norm hidden state."""
        a = self.config.attn
        b, _, t, _ = attn.shape
        x = residual + F.linear(attn.transpose(1, 2).reshape(b, t, a.q_size), self.o_weight)
        gate, up = F.linear(rms_norm(x, self.post_attention_norm, a.rms_norm_eps), self.gate_up_weight).chunk(2, -1)
        x = x + F.linear(F.silu(gate) * up, self.down_weight)
        return DrafterOutput(F.linear(rms_norm(x, self.norm, a.rms_norm_eps), self.lm_head), x)

    def forward_cached(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                       cache: StaticKVCache, slot_offset: int, write_cols: torch.Tensor, key_len: int,
                       mask: torch.Tensor) -> DrafterOutput:
        """Inference step: write K/V at ``write_cols`` [B, T] of the rows' slots, attend under ``mask``.

        ``mask`` is a boolean ``[B, 1, T, key_len]`` over cache positions.
        """
        q, keys, values = self._write_kv(tokens, hidden, positions, cache, slot_offset, write_cols, key_len)
        return self.finish(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True), hidden)

    def forward_cached_last(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                            cache: StaticKVCache, slot_offset: int, write_cols: torch.Tensor, key_len: int,
                            mask: torch.Tensor, query_index: torch.Tensor) -> DrafterOutput:
        """A catch-up, where only each row's last output is used: like :meth:`forward_cached`, K/V are written
        for every token, but attention, MLP and head run only at token ``query_index[b]`` [B] of each row, under
        a ``[B, 1, 1, key_len]`` mask, and the output has one token per row (a one-layer drafter's K/V depend on
        its input alone).
        """
        # A method of its own, not an option of forward_cached: it is the catch-up's compiled entry point, and
        # torch.compile keeps graphs (and their recompile limit) per code object, while forward_cached runs
        # inlined in the draft steps of the compiled tree expansion (tlt.rollout.speculative).
        q, keys, values = self._write_kv(tokens, hidden, positions, cache, slot_offset, write_cols, key_len)
        batch = torch.arange(tokens.shape[0], device=tokens.device)
        q = q[batch, :, query_index].unsqueeze(2)
        hidden = hidden[batch, query_index].unsqueeze(1)
        return self.finish(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True), hidden)

    def _write_kv(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                  cache: StaticKVCache, slot_offset: int, write_cols: torch.Tensor, key_len: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries of the tokens, and the rows' cached keys and values up to ``key_len`` with theirs written."""
        b, t = tokens.shape
        q, k, v = self.qkv(tokens, hidden, positions)
        rows = torch.arange(slot_offset, slot_offset + b, device=tokens.device)[:, None].expand(b, t)
        k_cache, v_cache = cache.keys[0], cache.values[0]
        k_cache[rows, :, write_cols] = k.transpose(1, 2)
        v_cache[rows, :, write_cols] = v.transpose(1, 2)
        return (q, k_cache[slot_offset:slot_offset + b, :, :key_len],
                v_cache[slot_offset:slot_offset + b, :, :key_len])

    def new_cache(self, num_slots: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(self.config.attn, num_slots, max_len, self.fc.dtype, self.fc.device)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]
