"""Which weights a quantization run quantizes, and to what: llama.cpp's choices by default.

Measured with llama.cpp's own `llama_model_quantize` (llama-cpp-python 0.3.36) on tiny F32 models
(`tests/test_quant.py::test_llama_cpp_tensor_types` re-checks it), and `convert_hf_to_gguf.py`
for Q8_0:
- norms (1-D) stay F32;
- every block linear weight gets the file type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, a K-quant);
  llama.cpp's K-quant mixes (Q4_K_M ...) choose per tensor and layer (`quant/file_types.py`);
- the token embedding and the output head: what the format object says
  (`Format.default_embed` / `default_head`, `quant/formats/base.py`). For the GGML types:
  Q8_0 puts both in Q8_0; the others give the token embedding the file type, but the output
  head (or, when the embeddings are tied, the shared embedding) Q6_K when its row length is a
  multiple of 256 and Q8_0 otherwise (SmolLM2: 576, so Q8_0). Generic formats quantize the
  block linears only.
"""
from __future__ import annotations

from dataclasses import dataclass

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.params import LAYER_WEIGHTS, WeightName
from alpaca_jax.quant.formats import parse_format

AUTO, KEEP = "auto", "none"


@dataclass(frozen=True)
class QuantSpec:
    """`weights`: the format of the block linears; `embed` / `head`: `auto` (llama.cpp's choice),
    `none` (kept in float) or a format name; `activations`: fake-quantize the inputs of quantized
    matmuls to 8-bit blocks as llama.cpp's CPU path does."""
    weights: str = "q8_0"
    embed: str = AUTO
    head: str = AUTO
    activations: bool = False


def _dims(cfg) -> dict:
    """The contracted dimension (a GGUF row's length), by kernel."""
    return {"wq": cfg.hidden_size, "wk": cfg.hidden_size, "wv": cfg.hidden_size,
            "wo": cfg.q_size, "w_gate": cfg.hidden_size, "w_up": cfg.hidden_size,
            "w_down": cfg.intermediate_size, "embed": cfg.hidden_size,
            "lm_head": cfg.hidden_size}


def _mix_defaults(mix: str, cfg) -> tuple[dict, str, str]:
    """(layer weights, head default, untied-embedding default) of a llama.cpp file type: a
    layer weight is one format, or a tuple of one per layer where the mix varies by layer."""
    from alpaca_jax.quant.file_types import tensor_type
    dims, L = _dims(cfg), cfg.num_layers
    out = {}
    for wn in LAYER_WEIGHTS:
        per = tuple(tensor_type(mix, wn.kernel, dims[wn.kernel], i, L) for i in range(L))
        out[wn.key] = per[0] if len(set(per)) == 1 else per
    D = cfg.hidden_size
    return out, tensor_type(mix, "output", D), tensor_type(mix, "token_embd", D)


def resolve(spec: QuantSpec, cfg: ModelConfig) -> dict:
    """`{param name: format}` for every quantized weight (`layers/<kernel>`, `embed`,
    `lm_head`); a name absent is kept in float. `spec.weights` is a format or a llama.cpp
    K-quant file type (`q4_k_m`, `q4_k_s`, `q5_k_m`, `q5_k_s`: `quant/file_types.py`), whose
    layer weights may get a tuple of one format per layer. A K-quant whose 256-blocks do not
    tile a weight's rows falls back as llama.cpp's does (Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0). Raises ValueError for an unknown format or, for the other formats, a
    contracted dimension that is not a multiple of the block size."""
    from alpaca_jax.quant.file_types import fallback, has_fallback, is_file_type

    def pick(choice, default):
        if choice == AUTO:
            return default
        if choice in (KEEP, None):
            return None
        return parse_format(choice).name

    if is_file_type(spec.weights):
        out, head_default, untied = _mix_defaults(str(spec.weights).lower(), cfg)
        embed_default = head_default if cfg.tie_embeddings else untied
    else:
        fmt = parse_format(spec.weights)
        out = {wn.key: fmt.name for wn in LAYER_WEIGHTS}
        head_default = fmt.default_head(cfg.hidden_size)   # rows of the head/embedding: D
        embed_default = fmt.default_embed(cfg.hidden_size, cfg.tie_embeddings)
    e = pick(spec.embed, embed_default)
    if e:
        out["embed"] = e
    if not cfg.tie_embeddings:
        h = pick(spec.head, head_default)
        if h:
            out["lm_head"] = h
    elif spec.head not in (AUTO, KEEP, None) and pick(spec.head, None) != e:
        raise ValueError(f"quant head={spec.head!r} differs from embed={e!r}, but this model "
                         "ties its embeddings: they are one tensor")
    dims = _dims(cfg)
    for name, fmt in list(out.items()):
        dim = dims[WeightName.parse(name).kernel]
        fixed = []
        for f in (fmt,) if isinstance(fmt, str) else fmt:
            g = fallback(f, dim) if has_fallback(f) else f
            block = 32 if g == "f16" else parse_format(g).block or 1
            if g == "f16" or dim % block:
                raise ValueError(
                    f"cannot quantize {name} to {f}: its contracted dimension {dim} is not a "
                    f"multiple of the block size {block} (llama.cpp's converter would fall "
                    "back to F16 for such a tensor; pick another format for it or keep it "
                    "with 'none')")
            fixed.append(g)
        out[name] = fixed[0] if isinstance(fmt, str) else tuple(fixed)
    return out


def block_axis(name: str) -> int:
    """The contracted axis of each quantized leaf (per-layer slices: kernels `[in, out]`)."""
    return -1 if name == "embed" else -2

