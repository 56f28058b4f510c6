"""Save and load EAGLE-3 drafters in the on-disk format vLLM and SGLang read.

Directory layout: ``config.json`` (``LlamaForCausalLMEagle3``, ``draft_vocab_size``,
``eagle_config.eagle_aux_hidden_state_layer_ids``) and ``model.safetensors`` with

=================================================  ==========================================
``fc.weight``                                      ``[H, 3*H_target]`` feature fusion
``midlayer.input_layernorm.weight``                norm of the token embedding
``midlayer.hidden_norm.weight``                    norm of the incoming hidden state
``midlayer.self_attn.{q,k,v}_proj.weight``         input width ``2H``
``midlayer.self_attn.o_proj.weight``
``midlayer.post_attention_layernorm.weight``
``midlayer.mlp.{gate,up,down}_proj.weight``
``norm.weight``, ``lm_head.weight``                ``lm_head``: ``[draft_vocab, H]``
``d2t`` (int64 ``[draft_vocab]``)                  offsets: ``target_id = draft_id + d2t[draft_id]``
``t2d`` (bool ``[target_vocab]``)                  target ids present in the draft vocabulary
=================================================  ==========================================

``d2t``/``t2d`` are written only for a reduced draft vocabulary: vLLM 0.32 has no parameter for
them when ``draft_vocab_size == vocab_size`` and refuses such a checkpoint.

The token embedding is not stored (it is the target's). Layer-id convention: id ``j`` is the input of
target layer ``j`` (HF ``hidden_states[j]``), as vLLM uses configured ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tlt.errors import ModelLoadError
from tlt.models.config import read_json
from tlt.models.drafter import DrafterConfig, Eagle3Drafter
from tlt.models.loader import read_safetensors
from tlt.models.transformer import CausalLM

_PLAIN = {
    "fc": "fc.weight",
    "input_norm": "midlayer.input_layernorm.weight",
    "hidden_norm": "midlayer.hidden_norm.weight",
    "o_weight": "midlayer.self_attn.o_proj.weight",
    "post_attention_norm": "midlayer.post_attention_layernorm.weight",
    "down_weight": "midlayer.mlp.down_proj.weight",
    "norm": "norm.weight",
    "lm_head": "lm_head.weight",
}
_FUSED = {
    "qkv_weight": [f"midlayer.self_attn.{n}_proj.weight" for n in "qkv"],
    "gate_up_weight": ["midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight"],
}


def drafter_state_dict(drafter: Eagle3Drafter) -> dict[str, torch.Tensor]:
    """Weights under the EAGLE-3 checkpoint names (fused projections split)."""
    a = drafter.config.attn
    params = dict(drafter.named_parameters())
    out = {hf: params[ours].detach() for ours, hf in _PLAIN.items()}
    sizes = {"qkv_weight": [a.q_size, a.kv_size, a.kv_size], "gate_up_weight": [a.intermediate_size] * 2}
    for ours, names in _FUSED.items():
        out.update(zip(names, params[ours].detach().split(sizes[ours], dim=0)))
    if drafter.config.draft_vocab_size != drafter.config.target_vocab_size:
        out["d2t"] = drafter.d2t.detach()
        out["t2d"] = drafter.t2d.detach()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def save_drafter(drafter: Eagle3Drafter, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the drafter as an EAGLE-3 checkpoint directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in drafter_state_dict(drafter).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = drafter.config.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def drafter_inference_dtype(target: CausalLM) -> torch.dtype:
    """The dtype a drafter runs in next to ``target``: fp32 on CPU, the target's dtype elsewhere.

    On CPU, bf16 GEMMs as small as a drafter's (a few rows) cost about three times fp32 ones (oneDNN:
    40 vs 13 us for a 1x256x768 linear, measured on a 2-core Xeon with AMX), and a one-layer drafter in
    fp32 costs little memory. (For the target, bf16 verification of a whole tree costs about what a one-token
    step does, which is what speculation needs.) Losslessness does not depend on the drafter's dtype: the
    target verifies every token.
    """
    return torch.float32 if target.device.type == "cpu" else target.dtype


def load_drafter(model_dir: str | Path, target: CausalLM, dtype: torch.dtype | None = None) -> Eagle3Drafter:
    """Load an EAGLE-3 checkpoint for ``target`` (checks that shapes and vocabularies fit it), in ``dtype``
    (default: :func:`drafter_inference_dtype`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"drafter directory {model_dir} does not exist")
    config = DrafterConfig.from_hf_dict(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
    if config.target_hidden_size != target.config.hidden_size or config.target_vocab_size != target.config.vocab_size:
        raise ModelLoadError(
            f"{model_dir}: drafter was made for a target with hidden_size {config.target_hidden_size} and vocab "
            f"{config.target_vocab_size}, this target has {target.config.hidden_size} and {target.config.vocab_size}"
        )
    bad = [j for j in config.aux_layer_ids if j > target.config.num_hidden_layers]
    if bad:
        raise ModelLoadError(f"{model_dir}: aux layer ids {bad} exceed the target's {target.config.num_hidden_layers}")
    drafter = Eagle3Drafter(config, target.embed, max_positions=target.rope_cos.shape[0])
    copy_drafter_tensors(drafter, read_safetensors(model_dir), str(model_dir))
    return drafter.to(device=target.device, dtype=dtype or drafter_inference_dtype(target)).eval()


def copy_drafter_tensors(drafter: Eagle3Drafter, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy EAGLE-3-named ``tensors`` into ``drafter`` in place (a reload keeps the module engines hold)."""
    params = dict(drafter.named_parameters())
    expected = {**{hf: ours for ours, hf in _PLAIN.items()}, **{n: k for k, ns in _FUSED.items() for n in ns}}
    reduced = drafter.config.draft_vocab_size != drafter.config.target_vocab_size
    missing = [name for name in [*expected, *(["d2t"] if reduced else [])] if name not in tensors]
    if missing:
        raise ModelLoadError(f"{source}: drafter checkpoint is missing tensors: {', '.join(missing)}")
    with torch.no_grad():
        for ours, hf in _PLAIN.items():
            _copy(params[ours], tensors[hf], hf, source)
        for ours, names in _FUSED.items():
            _copy(params[ours], torch.cat([tensors[n] for n in names]), "+".join(names), source)
        if reduced:
            _copy(drafter.d2t, tensors["d2t"], "d2t", source)
            # vLLM ignores t2d; rebuild it from d2t so both always agree
            drafter.t2d.zero_()
            drafter.t2d[drafter.draft_to_target] = True


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, source: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src.to(dst.dtype))
