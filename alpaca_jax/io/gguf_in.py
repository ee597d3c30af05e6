"""GGUF (`general.architecture=llama`) in: quantized tensors dequantized by their registered
format (`quant/formats/`: the same code that quantizes and exports, checked against the `gguf`
package), float tensors converted by the `gguf` package, q/k un-permuted from llama.cpp's
interleaved RoPE layout, metadata mapped to ModelConfig."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from alpaca_jax.config import ModelConfig, RopeScaling
from alpaca_jax.io.layout import assemble_params, host_buffer, param_dtype

FLOAT_TYPES = ("F32", "F16", "BF16")
_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
                "wo": "attn_output", "mlp_norm": "ffn_norm", "w_gate": "ffn_gate",
                "w_up": "ffn_up", "w_down": "ffn_down"}


def unpermute_rope(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's `permute`: interleaved pairs -> rotate_half halves."""
    out = w_out_in.shape[0]
    return (w_out_in.reshape(n_heads, out // n_heads // 2, 2, *w_out_in.shape[1:])
            .swapaxes(1, 2).reshape(w_out_in.shape))


def permute_rope(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `permute`: rotate_half halves -> llama.cpp's interleaved pairs."""
    out = w_out_in.shape[0]
    return (w_out_in.reshape(n_heads, 2, out // n_heads // 2, *w_out_in.shape[1:])
            .swapaxes(1, 2).reshape(w_out_in.shape))


def read_fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a field whose type the reader cannot decode is left out by design
            continue
    return out


def config_from_gguf(f: dict, source: str) -> ModelConfig:
    arch = f.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture={arch!r} is not supported (llama only)")

    def need(key):
        if key not in f:
            raise ValueError(f"{source}: missing GGUF metadata key {key!r}")
        return f[key]

    heads = need("llama.attention.head_count")
    hidden = need("llama.embedding_length")
    head_dim = f.get("llama.attention.key_length", f.get("llama.rope.dimension_count", hidden // heads))
    scaling = None
    kind = f.get("llama.rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling("linear", float(need("llama.rope.scaling.factor")))
    elif kind not in ("none", None):
        raise ValueError(f"{source}: llama.rope.scaling.type={kind!r} is not supported "
                         "(linear or none)")
    vocab = f.get("llama.vocab_size", len(f.get("tokenizer.ggml.tokens", [])) or None)
    if vocab is None:
        raise ValueError(f"{source}: neither llama.vocab_size nor a token list in the metadata")
    eos = f.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(need("llama.feed_forward_length")),
        num_layers=int(need("llama.block_count")), num_heads=int(heads),
        num_kv_heads=int(f.get("llama.attention.head_count_kv", heads)), head_dim=int(head_dim),
        rms_norm_eps=float(f.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(f.get("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_embeddings=False,  # decided by the presence of output.weight below
        max_position_embeddings=int(f.get("llama.context_length", 2048)),
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def supported_types() -> tuple[str, ...]:
    """GGUF tensor types import reads: the float types and every registered GGML format.
    (The registry is imported here, not at module level: it imports `gguf`, which `import
    alpaca_jax` does not need.)"""
    from alpaca_jax.quant.formats import exportable_formats

    return FLOAT_TYPES + tuple(f.upper() for f in exportable_formats())


def _dequantizer(tensor_type):
    """`raw [rows, row_bytes] uint8 -> float32 [rows, cols]` for one GGUF tensor type: the
    registered format's `from_bytes` and `dequantize`, or the `gguf` package for float types."""
    import gguf

    from alpaca_jax.quant.formats import format_for_ggml_type

    fmt = format_for_ggml_type(tensor_type)
    if fmt is None:
        return lambda raw: gguf.quants.dequantize(raw, tensor_type)

    def dequantize(raw):
        values = np.asarray(fmt.dequantize(fmt.from_bytes(raw)))   # [rows, n_blocks, block]
        return values.reshape(len(raw), -1)
    return dequantize


def read_tensor(f, t, source: str) -> np.ndarray:
    """One tensor dequantized to float32 `[out, in]`, read in chunks of rows with plain reads:
    the reader's memory map is never touched, so read pages do not pile up in resident memory
    (a map keeps them counted until it is closed: a second copy of the file), and the raw
    blocks never coexist whole with their dequantized values. The result is an aligned buffer
    that the loader can place without copying (`io/layout.py`)."""
    import gguf

    supported = supported_types()
    if t.tensor_type.name not in supported:
        raise ValueError(f"{source}: tensor {t.name!r} has type {t.tensor_type.name}; "
                         f"supported: {', '.join(supported)}")
    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    cols = int(t.shape[0])
    row_bytes = cols // block * type_size
    if int(t.n_bytes) % row_bytes:
        raise ValueError(f"{source}: tensor {t.name!r} has {t.n_bytes} bytes, not whole rows")
    n_rows = int(t.n_bytes) // row_bytes
    out = host_buffer((n_rows, cols), np.float32)
    step = max(1, (16 << 20) // row_bytes)          # about 16 MB of raw blocks per read
    dequantize = _dequantizer(t.tensor_type)
    f.seek(int(t.data_offset))
    for a in range(0, n_rows, step):
        raw = np.empty((min(step, n_rows - a), row_bytes), np.uint8)
        if f.readinto(memoryview(raw).cast("B")) != raw.size:
            raise ValueError(f"{source}: tensor {t.name!r} is truncated")
        out[a:a + len(raw)] = dequantize(raw)
    return out.reshape(tuple(int(n) for n in reversed(t.shape)))


def load_gguf(path, dtype=None, sharding=None):
    """`(params, cfg, tokenizer)` from a llama GGUF file. dtype: the params' dtype; None or
    `auto` is float32, what quantized blocks dequantize to (a GGUF keeps its norms in F32 even
    beside F16 or BF16 matrices, so no narrower type is the file's own). Tensors are dequantized one at a time straight
    into their stacked destinations (`io/layout.py`), placed with `sharding`."""
    import gguf

    from alpaca_jax.tokenizer.load import tokenizer_from_gguf_fields

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read as GGUF ({type(e).__name__}: {e})") from e
    fields = read_fields(reader)
    source = str(path)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{source}: per-frequency RoPE factors (rope_freqs.weight, llama3 "
                         "scaling) are not supported on GGUF import; load the HF checkpoint")
    cfg = config_from_gguf(fields, source)
    cfg = cfg.replace(tie_embeddings="output.weight" not in tensors)
    dtype = param_dtype("float32" if dtype is None or dtype == "auto" else dtype)

    def unpermute_qk(ours, w):
        if ours == "wq":
            return unpermute_rope(w, cfg.num_heads)
        if ours == "wk":
            return unpermute_rope(w, cfg.num_kv_heads)
        return w

    names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
             "lm_head": "output.weight",
             "layers": {ours: f"blk.{{i}}.{g}.weight" for ours, g in _LAYER_NAMES.items()}}
    with open(path, "rb") as f:
        params = assemble_params(
            lambda n: None if n not in tensors else read_tensor(f, tensors[n], source),
            cfg, names, source, fix=unpermute_qk, dtype=dtype, sharding=sharding, owned=True)
    del reader, tensors
    tokenizer = tokenizer_from_gguf_fields(fields, source)
    tokenizer.check_model(cfg, source)
    return params, cfg, tokenizer
