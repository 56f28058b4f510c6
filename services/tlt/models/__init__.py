"""Target model (own Llama/Qwen2 forward with a static KV cache) and the demo model builder."""

from tlt.models.config import ModelConfig
from tlt.models.kv_cache import StaticKVCache
from tlt.models.loader import load_model, save_model
from tlt.models.transformer import CausalLM, ForwardOutput

__all__ = ["CausalLM", "ForwardOutput", "ModelConfig", "StaticKVCache", "load_model", "save_model"]
