"""GGUF out: one llama-architecture file that llama.cpp runs on a CPU.

Adapters are merged, blocks numbered 0..L-1 (a pruned model is just a smaller one), q/k rows
permuted into llama.cpp's interleaved RoPE layout, norms kept F32, quantized tensors written with
exactly the codes of `alpaca_jax.quant.quantize_params` (so a QAT model ships on the grid it was
trained on), and the tokenizer embedded. The file is written beside its destination and renamed
into place, so a failure never leaves a half-written GGUF.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.io.gguf_in import _LAYER_NAMES, permute_rope
from alpaca_jax.model.params import LAYER_KERNELS, LAYER_NORMS

QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


def _check_destination(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give a .gguf file path")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{path}: directory {parent} is not writable")


def _tensor_plan(cfg: ModelConfig, qtype: str) -> dict:
    """{our key: GGML type name} for every 2-D weight; norms are always F32."""
    keys = ["embed"] + [f"layers/{k}" for k in LAYER_KERNELS]
    if not cfg.tie_embeddings:
        keys.append("lm_head")
    if qtype in ("F32", "F16"):
        return {k: qtype for k in keys}
    from alpaca_jax.quant.spec import QuantSpec, resolve

    try:
        formats = resolve(QuantSpec(qtype.lower()), cfg)
    except ValueError as e:
        raise ValueError(f"qtype {qtype} cannot be applied to this model: {e}") from e
    return {k: formats.get(k, "f16").upper() for k in keys}


def to_gguf(params: dict, cfg: ModelConfig, tokenizer, path, qtype: str = "Q8_0", *,
            name: str = "alpaca_jax model") -> Path:
    """Write `params` as a llama GGUF of `qtype` (F32, F16, Q8_0, Q4_0, Q4_1) with the tokenizer
    embedded; returns the path. Bad qtype, tokenizer or destination fail before any work."""
    import gguf

    from alpaca_jax.export.gguf_tokenizer import tokenizer_kv
    from alpaca_jax.peft.lora import merge

    qtype = str(qtype).upper()
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r} is not supported; supported: {', '.join(QTYPES)}")
    path = Path(path)
    _check_destination(path)
    tok_kv = tokenizer_kv(tokenizer, cfg)          # a tokenizer that cannot be embedded fails here
    plan = _tensor_plan(cfg, qtype)                # shapes the qtype cannot take fail here
    params = merge(params)
    quantized = _quantized_bytes(params, cfg, qtype)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        _write_metadata(w, cfg, name, qtype, tok_kv)
        _write_tensors(w, params, cfg, plan, quantized)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _quantized_bytes(params, cfg, qtype: str) -> dict:
    """ggml block bytes (rows `[..., out, row_bytes]`) of every quantized tensor, from the codes
    `quantize_params` computes for the same spec the plan came from."""
    if qtype in ("F32", "F16"):
        return {}
    from alpaca_jax.quant.formats import to_ggml_bytes
    from alpaca_jax.quant.qat import quantize_params
    from alpaca_jax.quant.spec import QuantSpec

    codes = quantize_params(params, QuantSpec(qtype.lower()), cfg)
    return {k: to_ggml_bytes(q) for k, q in codes.items()}


def _write_metadata(w, cfg: ModelConfig, name: str, qtype: str, tok_kv: list) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs.factor)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, value in tok_kv:
        getattr(w, method)(value)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """`rope_freqs.weight`: llama.cpp's per-frequency divisors for llama3 RoPE scaling, as
    convert_hf_to_gguf.py computes them."""
    rs = cfg.rope_scaling
    dim = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(rs.factor)
        else:
            smooth = ((rs.original_max_position_embeddings / wavelen - rs.low_freq_factor)
                      / (rs.high_freq_factor - rs.low_freq_factor))
            out.append(1.0 / ((1 - smooth) / rs.factor + smooth))
    return np.asarray(out, np.float32)


def _write_tensors(w, params, cfg: ModelConfig, plan: dict, quantized: dict) -> None:
    import gguf

    def emit(gguf_name, key, weight_out_in=None, rows=None, n_rope_heads=None):
        """A quantized tensor from its ggml rows, else the float weight `[out, in]`; q/k rows
        permuted for llama.cpp's RoPE (a row permutation commutes with row-wise quantization)."""
        t = plan[key]
        data = rows if t.startswith("Q") else np.asarray(weight_out_in, np.float32)
        if n_rope_heads is not None:
            data = permute_rope(data, n_rope_heads)
        if t.startswith("Q"):
            w.add_tensor(gguf_name, np.ascontiguousarray(data),
                         raw_dtype=gguf.GGMLQuantizationType[t])
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(data, np.float16 if t == "F16"
                                                         else np.float32))

    emit("token_embd.weight", "embed", params["embed"], quantized.get("embed"))
    w.add_tensor("output_norm.weight", np.asarray(params["final_norm"], np.float32))
    if not cfg.tie_embeddings:
        emit("output.weight", "lm_head", np.asarray(params["lm_head"]).T, quantized.get("lm_head"))
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads}
    layers = params["layers"]
    for i in range(cfg.num_layers):
        for norm in LAYER_NORMS:
            w.add_tensor(f"blk.{i}.{_LAYER_NAMES[norm]}.weight",
                         np.asarray(layers[norm][i], np.float32))
        for k in LAYER_KERNELS:
            key = f"layers/{k}"
            rows = quantized[key][i] if key in quantized else None
            weight = None if rows is not None else np.asarray(layers[k][i]).T
            emit(f"blk.{i}.{_LAYER_NAMES[k]}.weight", key, weight, rows, heads.get(k))
