"""llama.cpp's K-quant file types (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K): a format per tensor.

A K-quant GGGUF is a mix: `llama_tensor_get_type` in llama.cpp's `src/llama-quant.cpp` picks each
tensor's type from the file type, the tensor's role and its layer, then `tensor_type_fallback`
replaces a type whose 256-wide super-blocks do not tile the row (the contracted dimension).
This module is that choice for the dense LLaMA models this project handles (no experts, no
Falcon, no 70B special case, no importance matrix), so QAT, PTQ and export quantize every
tensor to the type llama.cpp would give it; `tests/test_file_types.py` checks it against
`llama_model_quantize` tensor by tensor.

- the output head, or a tied embedding: Q6_K when the row length is a multiple of the file's
  base block (256), else Q8_0; then the fallback (Q6_K -> Q8_0);
- `attn_v` and `ffn_down`: Q6_K in the layers `use_more_bits` picks for the _M types; for
  Q4_K_S, Q5_K in the first 4 `attn_v` and the first n/8 `ffn_down`;
- everything else (an untied embedding included): the base type; then the fallback
  (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 when the row is not whole super-blocks).
"""
from __future__ import annotations

# mix -> its base (default) tensor type. A Q6_K file is no mix: every tensor Q6_K, with the
# fallback, which `resolve` applies to any K-quant format.
FILE_TYPES = {"q4_k_m": "q4_k", "q4_k_s": "q4_k", "q5_k_m": "q5_k", "q5_k_s": "q5_k"}
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def is_file_type(name) -> bool:
    return str(name).lower() in FILE_TYPES


def check_quant_name(name) -> str:
    """A format or a file type, lower-case; a ValueError listing both otherwise."""
    from alpaca_jax.quant.formats import get_format
    if is_file_type(name):
        return str(name).lower()
    try:
        return get_format(name).name
    except ValueError as e:
        raise ValueError(f"{e}; or a llama.cpp K-quant file type: {', '.join(FILE_TYPES)}") \
            from None


def exportable_names() -> tuple[str, ...]:
    """Every name a GGUF export takes besides F32/F16: the GGML formats and the file types."""
    from alpaca_jax.quant.formats import exportable_formats
    return exportable_formats() + tuple(FILE_TYPES)


def has_fallback(fmt: str) -> bool:
    """Whether llama.cpp defines a fallback for `fmt` (the K-quants); for the others a row that
    is not whole blocks is an error."""
    return fmt in _FALLBACK


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes: the first and last
    eighth, and every third layer between."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def fallback(fmt: str, ncols: int) -> str:
    """`tensor_type_fallback`: the type llama.cpp writes when `fmt`'s blocks do not tile a row
    of `ncols` values (F16 when even the fallback's 32-blocks do not)."""
    from alpaca_jax.quant.formats import get_format
    if ncols % get_format(fmt).block == 0:
        return fmt
    fb = _FALLBACK.get(fmt)
    if fb is None or ncols % get_format(fb).block:
        return "f16"
    return fb


def tensor_type(file_type: str, role: str, ncols: int, layer: int | None = None,
                n_layers: int | None = None) -> str:
    """The format llama.cpp gives one tensor of a `file_type` file. `role`: `output` (the head,
    or the embedding when tied), `token_embd`, or a block kernel (`wq`, `wk`, `wv`, `wo`,
    `w_gate`, `w_up`, `w_down`) with its `layer` of `n_layers`; `ncols`: the row length (the
    contracted dimension)."""
    ft = file_type.lower()
    base = FILE_TYPES[ft]
    t = base
    if role == "output":
        t = "q6_k" if ncols % 256 == 0 else "q8_0"
    elif role == "wv":
        if ft in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            t = "q6_k"
        elif ft == "q4_k_s" and layer < 4:
            t = "q5_k"
    elif role == "w_down":
        if ft in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            t = "q6_k"
        elif ft == "q4_k_s" and layer < n_layers // 8:
            t = "q5_k"
    return fallback(t, ncols)
