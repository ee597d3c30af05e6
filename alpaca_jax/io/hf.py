"""HF safetensors checkpoints (`LlamaForCausalLM` layout) in and out.

Import is renaming, transposing `[out, in]` to `[in, out]` and stacking layers; no RoPE
permutation is needed because the core uses HF's `rotate_half` layout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from alpaca_jax.config import ModelConfig, RopeScaling
from alpaca_jax.io.layout import assemble_params, layer_slice, param_dtype
from alpaca_jax.io.safetensors_io import FLOAT_NAMES, SafetensorsFile, write_streaming
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


def _hf_names() -> dict:
    return {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
            "lm_head": "lm_head.weight",
            "layers": {ours: f"model.layers.{{i}}.{hf}" for ours, hf in _LAYER_NAMES.items()}}


def params_from_hf(tensors, cfg: ModelConfig, source: str = "checkpoint", dtype=np.float32,
                   sharding=None) -> dict:
    """Build the params pytree (jax arrays of `dtype`) from a name -> array mapping in HF naming
    and layout."""
    return assemble_params(lambda n: None if n not in tensors else np.asarray(tensors[n]),
                           cfg, _hf_names(), source, dtype=dtype, sharding=sharding)


def _hf_tensor_items(params: dict, cfg: ModelConfig):
    """`(HF name, shape, dtype, producer)` in file order; each producer makes one `[out, in]`
    numpy tensor in the params' own dtype when called, so a writer holds one tensor at a time."""
    check_params(params, cfg)

    def item(name, shape, dtype, make, transpose):
        shape = tuple(shape)
        return name, shape[::-1] if transpose else shape, np.dtype(dtype), make

    embed, norm = params["embed"], params["final_norm"]
    items = [item("model.embed_tokens.weight", embed.shape, embed.dtype,
                  lambda: np.asarray(embed), False),
             item("model.norm.weight", norm.shape, norm.dtype, lambda: np.asarray(norm), False)]
    for ours, hf_name in _LAYER_NAMES.items():
        s = params["layers"][ours]
        kernel = s.ndim == 3
        for i in range(cfg.num_layers):
            make = (lambda s=s, i=i: np.asarray(layer_slice(s, i)).T) if kernel else (
                lambda s=s, i=i: np.asarray(layer_slice(s, i)))
            items.append(item(f"model.layers.{i}.{hf_name}", s.shape[1:], s.dtype, make, kernel))
    if not cfg.tie_embeddings:
        head = params["lm_head"]
        items.append(item("lm_head.weight", head.shape, head.dtype,
                          lambda: np.asarray(head).T, True))
    return items


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(make())
            for name, _, _, make in _hf_tensor_items(params, cfg)}


def checkpoint_files(path: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the file holding it, for `model.safetensors` or the shards of its index;
    headers only (no tensor data is read)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for name in files:
        f = SafetensorsFile(path / name)
        out.update({t: f for t in f.header})
    return out


def checkpoint_dtype(files: dict[str, SafetensorsFile], source: str) -> str:
    """The float dtype holding most of the checkpoint's bytes (`bfloat16` for a bf16 release)."""
    counts: dict[str, int] = {}
    for f in set(files.values()):
        for dt, n in f.dtype_bytes().items():
            counts[dt] = counts.get(dt, 0) + n
    floats = {FLOAT_NAMES[d]: n for d, n in counts.items() if d in FLOAT_NAMES}
    if not floats:
        raise ValueError(f"{source}: no floating-point tensors (dtypes {sorted(counts)})")
    best = max(floats, key=floats.get)
    return "float32" if best == "float64" else best


def load_hf(path, dtype=None, sharding=None):
    """`(params, cfg, tokenizer)` from an HF model directory (tokenizer None if absent).

    dtype: the params' dtype (`float32`, `bfloat16`, `float16`); None or `auto` keeps the
    checkpoint's own. Tensors are read one at a time into their stacked, placed destinations
    (`io/layout.py`); `sharding` is passed through to the placement."""
    from alpaca_jax.tokenizer.load import load_hf_tokenizer

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: not an HF model directory (no config.json)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()), source=str(cfg_file))
    files = checkpoint_files(path)
    if dtype is None or dtype == "auto":
        dtype = checkpoint_dtype(files, str(path))
    dtype = param_dtype(dtype)       # a typo fails here, before any tensor is read
    params = assemble_params(lambda n: files[n].read(n) if n in files else None, cfg,
                             _hf_names(), str(path), dtype=dtype, sharding=sharding, owned=True)
    tokenizer = load_hf_tokenizer(path)
    if tokenizer is not None:
        tokenizer.check_model(cfg, source=str(path))
    return params, cfg, tokenizer


def save_hf(params: dict, cfg: ModelConfig, tokenizer, path, max_shard_bytes: int = 2 << 30):
    """Write `config.json`, safetensors in the params' own dtype (bf16 stays bf16; sharded above
    `max_shard_bytes`) and the tokenizer, so that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it. Tensors are produced and
    written one at a time (`io/safetensors_io.py`): host memory stays at one tensor."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{path}: output directory is not writable")
    items = sorted(_hf_tensor_items(params, cfg), key=lambda it: it[0])
    makers = {name: make for name, _, _, make in items}
    specs = {name: (shape, dtype) for name, shape, dtype, _ in items}
    shards, current, size = [], [], 0
    for name in specs:
        shape, dt = specs[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    fnames = (["model.safetensors"] if len(shards) == 1 else
              [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)])
    total = 0
    for fname, shard in zip(fnames, shards):
        total += write_streaming(path / fname, [(n, *specs[n]) for n in shard],
                                 lambda n: makers[n](), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {n: fname for fname, shard in zip(fnames, shards) for n in shard}
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtypes = {np.dtype(dt).name for _, dt in specs.values()}
    hf_cfg = config_to_hf(cfg)
    hf_cfg["torch_dtype"] = "bfloat16" if "bfloat16" in dtypes else (
        "float16" if "float16" in dtypes else "float32")
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_hf(path)
