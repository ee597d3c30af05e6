"""GGUF out: one llama-architecture file that llama.cpp runs on a CPU.

Adapters are merged, blocks numbered 0..L-1 (a pruned model is just a smaller one), q/k rows
permuted into llama.cpp's interleaved RoPE layout, norms kept F32, quantized tensors written with
exactly the codes of `alpaca_jax.quant.quantize_params` (so a QAT model ships on the grid it was
trained on), and the tokenizer embedded. The file is written beside its destination and renamed
into place, so a failure never leaves a half-written GGUF.

Streaming: the writer is told every tensor's name, shape and type first (header and tensor
infos), then each tensor is quantized (one layer's slice) or converted, written and dropped
in turn (`GGUFWriter.write_tensor_data`). Host memory is the params plus about one tensor, not
a second copy of the model in its output format.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.io.gguf_in import _LAYER_NAMES, permute_rope
from alpaca_jax.io.layout import layer_slice
from alpaca_jax.model.params import (LAYER_KERNELS, LAYER_NORMS, LAYER_WEIGHTS, LAYERS,
                                     WeightName)
from alpaca_jax.quant.file_types import exportable_names, is_file_type
from alpaca_jax.quant.formats import get_format

FLOAT_QTYPES = ("F32", "F16")
# every registered GGML format is a file type (`quant/formats/`)
QTYPES = FLOAT_QTYPES + tuple(f.upper() for f in exportable_names())   # formats, file types


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
    keys = [WeightName.parse("embed").key] + [w.key for w in LAYER_WEIGHTS]
    if not cfg.tie_embeddings:
        keys.append(WeightName.parse("lm_head").key)
    if qtype in FLOAT_QTYPES:
        return {k: qtype for k in keys}
    from alpaca_jax.quant.spec import QuantSpec, resolve

    try:
        formats = resolve(QuantSpec(qtype.lower()), cfg)
    except ValueError as e:
        raise ValueError(f"qtype {qtype} cannot be applied to this model: {e}") from e
    def upper(f):
        return f.upper() if isinstance(f, str) else tuple(x.upper() for x in f)
    return {k: upper(formats.get(k, "f16")) for k in keys}


def to_gguf(params: dict, cfg: ModelConfig, tokenizer, path, qtype: str = "Q8_0", *,
            name: str = "alpaca_jax model") -> Path:
    """Write `params` as a llama GGUF of `qtype` (one of `QTYPES`: F32, F16 and every registered
    GGML format, Q8_0, Q4_0, Q4_1) with the tokenizer embedded; returns the path. Bad qtype,
    tokenizer or destination fail before any work."""
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
    entries = _tensor_entries(params, cfg, plan)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        _write_metadata(w, cfg, name, qtype, tok_kv)
        for e in entries:
            w.add_tensor_info(e.name, e.shape, e.dtype, e.nbytes, raw_dtype=e.raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_tensors(w, entries)
        w.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
    floats = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}
    if qtype in floats:
        w.add_file_type(floats[qtype])
    elif is_file_type(qtype):
        w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    else:
        w.add_file_type(get_format(qtype).file_type)
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


@dataclass(frozen=True)
class _Entry:
    """One output tensor: what the header announces, and how to make its bytes when its turn
    comes (`shape` in numpy order: `[out, in]`, or `[out, row_bytes]` for ggml blocks)."""
    name: str
    shape: tuple
    dtype: np.dtype
    raw_dtype: object
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _chunks(w, out_axis: int, rows: int = 256):
    """`(a, b, w's output rows a:b)` of a 2-D weight, `rows` output rows at a time, sliced on
    the device: no host copy of the whole weight is made (`np.asarray` of a whole jax.Array also
    caches that copy on the array, for as long as the params live). The start is a traced
    operand, so each chunk shape compiles once, not once per offset."""
    n_out = w.shape[out_axis]
    for a in range(0, n_out, rows):
        size = min(rows, n_out - a)
        if size == n_out:
            yield a, a + size, w
        else:
            yield a, a + size, _dynamic_slice(w, a, size, out_axis)


def _dynamic_slice(w, start: int, size: int, axis: int):
    import jax
    import jax.numpy as jnp

    if isinstance(w, np.ndarray):
        return np.take(w, np.arange(start, start + size), axis=axis)
    return jax.lax.dynamic_slice_in_dim(w, jnp.int32(start), size, axis)


def _quantized_rows(w, fmt: str, axis: int, row_bytes: int) -> np.ndarray:
    """ggml block bytes `[out, row_bytes]` of one 2-D weight (`[in, out]` with axis -2, or the
    embedding `[V, D]` with axis -1), from the codes `quantize` gives: the function
    `quantize_params` applies, with a leading axis of 1 so the program keeps its rank. Output
    rows are independent, so the weight is quantized a chunk of rows at a time into the result
    (a float32 working copy of a whole bf16 embedding would be twice its size)."""
    from alpaca_jax.quant.formats import to_ggml_bytes

    out_axis = 0 if axis == -1 else 1
    rows = np.empty((w.shape[out_axis], row_bytes), np.uint8)
    for a, b, part in _chunks(w, out_axis):
        rows[a:b] = to_ggml_bytes(_jitted_quantize()(part[None], fmt, axis))[0]
    return rows


def _float_rows(w, out_axis: int, dtype) -> np.ndarray:
    """`[out, in]` host copy of a 2-D weight in `dtype`, converted a chunk at a time."""
    res = np.empty((w.shape[out_axis], w.shape[1 - out_axis]), dtype)
    for a, b, part in _chunks(w, out_axis):
        p = np.asarray(part).astype(np.float32, copy=False)
        res[a:b] = p if out_axis == 0 else p.T
    return res


@functools.lru_cache(maxsize=None)
def _jitted_quantize():
    """One jitted `quantize`, so each distinct weight shape compiles once per process."""
    import jax

    from alpaca_jax.quant.formats import quantize

    return jax.jit(quantize, static_argnums=(1, 2))


def _tensor_entries(params, cfg: ModelConfig, plan: dict) -> list[_Entry]:
    """Every tensor of the file in order, each made lazily from one slice of `params`."""
    from alpaca_jax.quant.spec import block_axis

    def f32(name, make, shape):
        return _Entry(name, tuple(shape), np.dtype(np.float32), None,
                      lambda: np.ascontiguousarray(make(), np.float32))

    def weight(gguf_name, key, get_in_out, shape_out_in, n_rope_heads=None, layer=None):
        """A float (F32/F16) or ggml-quantized tensor from the weight `get_in_out()` (a jax or
        numpy array `[in, out]`; the embedding `[V, D]`, blocks along D); q/k rows permuted for
        llama.cpp's RoPE (a row permutation commutes with row-wise quantization)."""
        t = plan[key] if layer is None or isinstance(plan[key], str) else plan[key][layer]
        out, inp = shape_out_in
        out_axis = 0 if key == "embed" else 1
        if t not in FLOAT_QTYPES:
            fmt = get_format(t)
            row_bytes = inp // fmt.block * fmt.type_size

            def make_q():
                rows = _quantized_rows(get_in_out(), fmt.name, block_axis(key), row_bytes)
                return rows if n_rope_heads is None else np.ascontiguousarray(
                    permute_rope(rows, n_rope_heads))
            return _Entry(gguf_name, (out, row_bytes), np.dtype(np.uint8), fmt.ggml_type, make_q)
        dt = np.dtype(np.float16 if t == "F16" else np.float32)

        def make_f():
            data = _float_rows(get_in_out(), out_axis, dt)
            return data if n_rope_heads is None else np.ascontiguousarray(
                permute_rope(data, n_rope_heads))
        return _Entry(gguf_name, (out, inp), dt, None, make_f)

    D, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    entries = [weight("token_embd.weight", "embed", lambda: params["embed"], (V, D)),
               f32("output_norm.weight", lambda: _host(params["final_norm"]), (D,))]
    if not cfg.tie_embeddings:
        entries.append(weight("output.weight", "lm_head", lambda: params["lm_head"], (V, D)))
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3":
        entries.append(f32("rope_freqs.weight", lambda: llama3_rope_factors(cfg),
                           (cfg.head_dim // 2,)))
    heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads}
    layers = params["layers"]
    for i in range(L):
        for norm in LAYER_NORMS:
            entries.append(f32(f"blk.{i}.{_LAYER_NAMES[norm]}.weight",
                               lambda n=norm, i=i: _host(layer_slice(layers[n], i)), (D,)))
        for k in LAYER_KERNELS:
            inp, out = tuple(np.shape(layers[k])[1:])
            entries.append(weight(f"blk.{i}.{_LAYER_NAMES[k]}.weight", WeightName(LAYERS, k).key,
                                  lambda k=k, i=i: layer_slice(layers[k], i), (out, inp),
                                  heads.get(k), layer=i))
    return entries


def _write_tensors(w, entries: list[_Entry]) -> None:
    """Each tensor made, written and dropped in turn: one tensor's bytes alive at a time."""
    for e in entries:
        data = e.produce()
        if data.shape != e.shape or data.dtype != e.dtype:
            raise AssertionError(f"{e.name}: produced {data.shape} {data.dtype}, "
                                 f"announced {e.shape} {e.dtype}")
        w.write_tensor_data(data)
        del data


def _host(x) -> np.ndarray:
    """A host copy of a norm vector (`[D]`: small, unlike the weights, which go through
    `_chunks`)."""
    return np.asarray(x)
