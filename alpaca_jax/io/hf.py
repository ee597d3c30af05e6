"""HF safetensors checkpoints (`LlamaForCausalLM` layout) in and out.

Import is renaming, transposing `[out, in]` to `[in, out]` and stacking layers; no RoPE
permutation is needed because the core uses HF's `rotate_half` layout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig, RopeScaling
from alpaca_jax.io.layout import assemble_params
from alpaca_jax.model.params import check_params

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# ours -> HF name inside `model.layers.{i}.`
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}


def _rope_from_hf(d: dict, source: str) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
    rp = d.get("rope_parameters") or {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported "
                         "(supported: linear, llama3, or none)")
    extra = {}
    if kind == "llama3":
        extra = {k: scaling[k] for k in ("low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings")}
    return theta, RopeScaling(rope_type=kind, factor=float(scaling["factor"]), **extra)


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    archs = d.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: architectures={archs} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported (LLaMA has no biases)")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={d['hidden_act']!r} is not supported (silu only)")
    window = d.get("sliding_window")
    if window is not None and window < d.get("max_position_embeddings", 0):
        raise ValueError(f"{source}: sliding_window={window} attention is not supported")
    theta, scaling = _rope_from_hf(d, source)
    eos = d.get("eos_token_id")
    eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
    heads = d["num_attention_heads"]
    return ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1
        else cfg.eos_token_ids[0],
        "torch_dtype": "float32",
    }
    s = cfg.rope_scaling
    if s is not None:
        d["rope_scaling"] = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            d["rope_scaling"].update(
                low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings)
    return d


def params_from_hf(tensors, cfg: ModelConfig, source: str = "checkpoint") -> dict:
    """Build the params pytree from a name -> array mapping in HF naming and layout."""
    names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
             "lm_head": "lm_head.weight",
             "layers": {ours: f"model.layers.{{i}}.{hf}" for ours, hf in _LAYER_NAMES.items()}}
    return assemble_params(lambda n: None if n not in tensors else np.asarray(tensors[n]),
                           cfg, names, source)


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    check_params(params, cfg)
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
           "model.norm.weight": np.asarray(params["final_norm"])}
    for ours, hf_name in _LAYER_NAMES.items():
        stacked = np.asarray(params["layers"][ours])
        for i in range(cfg.num_layers):
            w = stacked[i].T if stacked.ndim == 3 else stacked[i]
            out[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(w)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    return out


def read_safetensors_dir(path: Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards named in its index."""
    from safetensors.numpy import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path / name}: cannot read safetensors file ({e})") from e
    return tensors


def load_hf(path, dtype=np.float32):
    """`(params, cfg, tokenizer)` from an HF model directory (tokenizer None if absent)."""
    from alpaca_jax.tokenizer.load import load_hf_tokenizer

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: not an HF model directory (no config.json)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()), source=str(cfg_file))
    tensors = read_safetensors_dir(path)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype),
                                    params_from_hf(tensors, cfg, source=str(path)))
    tokenizer = load_hf_tokenizer(path)
    if tokenizer is not None:
        tokenizer.check_model(cfg, source=str(path))
    return params, cfg, tokenizer


def save_hf(params: dict, cfg: ModelConfig, tokenizer, path, max_shard_bytes: int = 2 << 30):
    """Write `config.json`, fp32 safetensors (sharded above `max_shard_bytes`) and the
    tokenizer, so that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{path}: output directory is not writable")
    tensors = {k: v.astype(np.float32) for k, v in params_to_hf(params, cfg).items()}
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    if tokenizer is not None:
        tokenizer.save_hf(path)
