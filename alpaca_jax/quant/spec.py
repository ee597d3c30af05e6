"""Which weights a quantization run quantizes, and to what: llama.cpp's choices by default.

Measured with llama.cpp's own `llama_model_quantize` (llama-cpp-python 0.3.36) on tiny F32 models
(`tests/test_quant.py::test_llama_cpp_tensor_types` re-checks it), and `convert_hf_to_gguf.py`
for Q8_0:
- norms (1-D) stay F32;
- every block linear weight gets the file type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; one K-quant
  type for all of them: the K-quant mixes Q4_K_M etc. are not modelled here yet);
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


def resolve(spec: QuantSpec, cfg: ModelConfig) -> dict[str, str]:
    """`{param name: format}` for every quantized weight (`layers/<kernel>`, `embed`,
    `lm_head`); a name absent is kept in float. Raises ValueError for an unknown format or a
    contracted dimension that is not a multiple of the block size."""
    fmt = parse_format(spec.weights)
    w = fmt.name
    out = {wn.key: w for wn in LAYER_WEIGHTS}

    def pick(choice, default):
        if choice == AUTO:
            return default
        if choice in (KEEP, None):
            return None
        return parse_format(choice).name

    head_default = fmt.default_head(cfg.hidden_size)   # rows of the head/embedding: D long
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
    dims = {"wq": cfg.hidden_size, "wk": cfg.hidden_size, "wv": cfg.hidden_size,
            "wo": cfg.q_size, "w_gate": cfg.hidden_size, "w_up": cfg.hidden_size,
            "w_down": cfg.intermediate_size, "embed": cfg.hidden_size,
            "lm_head": cfg.hidden_size}       # the contracted dimension, by kernel
    for name, fmt in out.items():
        f = parse_format(fmt)
        block = f.block or 1
        dim = dims[WeightName.parse(name).kernel]
        if dim % block:
            raise ValueError(
                f"cannot quantize {name} to {fmt}: its contracted dimension {dim} is not a "
                f"multiple of the block size {block} (llama.cpp's converter would fall back to "
                "F16 for such a tensor; pick another format for it or keep it with 'none')")
    return out


def block_axis(name: str) -> int:
    """The contracted axis of each quantized leaf (per-layer slices: kernels `[in, out]`)."""
    return -1 if name == "embed" else -2

