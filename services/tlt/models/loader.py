"""Load and save :class:`CausalLM` weights in the Hugging Face safetensors layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tlt.errors import ConfigError, ModelLoadError
from tlt.models.config import ModelConfig, read_json
from tlt.models.transformer import CausalLM

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map 'bfloat16' / 'float32' / ... to a torch dtype, with an error naming the choices."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"dtype '{name}' is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA device, else ``cpu``; ``cuda`` without one is refused."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device is 'cuda' but torch sees no CUDA device here: set model.device to "
                          "'auto' or 'cpu', or run where a GPU is visible")
    return name


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        return sorted({model_dir / name for name in weight_map.values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir} holds no *.safetensors weights (pickled .bin checkpoints are not loaded; convert them)"
        )
    return files


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, with errors naming the bad file."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(model_dir):
        if not path.is_file():
            raise ModelLoadError(f"weight shard {path} listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({exc})") from None
    return tensors


def _hf_key_map(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> HF tensor name, for the unfused tensors."""
    keys = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    if not config.tie_word_embeddings:
        keys["lm_head_weight"] = "lm_head.weight"
    for i in range(config.num_hidden_layers):
        p, hf = f"layers.{i}.", f"model.layers.{i}."
        keys[p + "input_norm"] = hf + "input_layernorm.weight"
        keys[p + "post_attention_norm"] = hf + "post_attention_layernorm.weight"
        keys[p + "o_weight"] = hf + "self_attn.o_proj.weight"
        keys[p + "down_weight"] = hf + "mlp.down_proj.weight"
    return keys


def _fused_parts(config: ModelConfig) -> dict[str, list[str]]:
    """Our fused parameter name -> the HF tensors concatenated (in order) along dim 0."""
    parts: dict[str, list[str]] = {}
    for i in range(config.num_hidden_layers):
        p, hf = f"layers.{i}.", f"model.layers.{i}."
        parts[p + "qkv_weight"] = [hf + f"self_attn.{n}_proj.weight" for n in "qkv"]
        if config.attention_bias:
            parts[p + "qkv_bias"] = [hf + f"self_attn.{n}_proj.bias" for n in "qkv"]
        parts[p + "gate_up_weight"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
    return parts


def load_state_dict_from_hf(model: CausalLM, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy HF-named tensors into ``model``; errors list missing names and shape mismatches."""
    config = model.config
    params = dict(model.named_parameters())
    direct = _hf_key_map(config)
    fused = _fused_parts(config)
    # Tied checkpoints sometimes still carry lm_head.weight; untied ones must.
    missing = [hf for hf in direct.values() if hf not in tensors]
    missing += [hf for names in fused.values() for hf in names if hf not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source}: checkpoint is missing tensors: {shown}")
    with torch.no_grad():
        for ours, hf in direct.items():
            _copy_checked(params[ours], tensors[hf], hf, source)
        for ours, names in fused.items():
            _copy_checked(params[ours], torch.cat([tensors[n] for n in names], dim=0), "+".join(names), source)


def _copy_checked(param: torch.Tensor, value: torch.Tensor, name: str, source: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ModelLoadError(
            f"{source}: tensor {name} has shape {tuple(value.shape)}, config.json implies {tuple(param.shape)}"
        )
    param.copy_(value.to(param.dtype))


def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (fused projections split back), contiguous, on CPU."""
    config = model.config
    params = dict(model.named_parameters())
    out = {hf: params[ours].detach() for ours, hf in _hf_key_map(config).items()}
    for ours, names in _fused_parts(config).items():
        sizes = _split_sizes(config, names)
        for name, chunk in zip(names, params[ours].detach().split(sizes, dim=0)):
            out[name] = chunk
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _split_sizes(config: ModelConfig, names: list[str]) -> list[int]:
    if len(names) == 2:
        return [config.intermediate_size, config.intermediate_size]
    return [config.q_size, config.kv_size, config.kv_size]


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", max_positions: int | None = None
) -> CausalLM:
    """Load a HF Llama/Qwen2 model directory (config.json + safetensors) into our :class:`CausalLM`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    config = ModelConfig.from_dir(model_dir)
    torch_dtype = parse_dtype(dtype)
    tensors = read_safetensors(model_dir)
    model = CausalLM(config, max_positions=max_positions)
    load_state_dict_from_hf(model, tensors, str(model_dir))
    model.hf_config = read_json(model_dir / "config.json")
    return model.to(device=device, dtype=torch_dtype).eval()


def save_model(model: CausalLM, out_dir: str | Path, hf_config: dict | None = None) -> Path:
    """Write config.json and model.safetensors in the HF layout (loadable by transformers and vLLM)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = hf_config or getattr(model, "hf_config", None)
    if raw is None:
        raise ValueError("save_model needs the HF config dict (hf_config) of the model")
    save_file(hf_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return out_dir
