"""alpaca_jax: compression ablations (LoRA, depth pruning, QAT, GGUF export) of LLaMA-family
models in JAX. The names below are the public API; everything else may move."""
from alpaca_jax.config import ModelConfig, RopeScaling
from alpaca_jax.io.hf import load_hf, save_hf
from alpaca_jax.io.gguf_in import load_gguf
from alpaca_jax.io.registry import REGISTRY, load_model
from alpaca_jax.model.forward import forward, make_cache
from alpaca_jax.model.transform import identity
from alpaca_jax.model.generate import generate, generate_ids
from alpaca_jax.model.params import check_params, count_params, init_params

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "RopeScaling", "init_params", "check_params", "count_params", "forward",
    "identity", "make_cache", "generate", "generate_ids", "load_model", "load_hf", "load_gguf",
    "save_hf", "REGISTRY",
]
