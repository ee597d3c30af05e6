"""Weight quantization formats, one object each, in one registry (`base.py`).

GGML tensor types, bit-exact with ggml's reference quantizers (the `gguf` package's `quants`
module and ggml's own `ggml_quantize_chunk` are the test oracles): `q8_0.py`, `q4_0.py`,
`q4_1.py`, `q5_0.py`, `q5_1.py`, and the K-quants Q6_K, Q4_K, Q5_K in `kquants.py` (their
search on the host, `kquant_search.py`). Generic symmetric integer formats
for ablations, not exportable: `generic.py` (`int8_channel`, `int4_g<N>`, ...). Everything that
lists formats reads the registry: `GGML_TYPES` / `exportable_formats()`, export's `QTYPES`, GGUF
import, `quant/spec.py`'s tensor policy.

Adding a format: a module here with a `GGMLFormat` (or `Format`) subclass decorated with
`@register_format`, its import in the list below, and its name in the parametrizations of
`tests/test_quant.py` (docs/ARCHITECTURE.md, "How to add a variant").
"""
from alpaca_jax.quant.formats.activations import QK8 as BLOCK
from alpaca_jax.quant.formats.base import (Format, GGMLFormat, Quantized, exportable_formats,
                                           format_for_ggml_type, get_format, register_family,
                                           register_format, registered_formats)
from alpaca_jax.quant.formats.numerics import roundf
from alpaca_jax.quant.formats.ops import (dequantize_blocks, fake_quant, fake_quant_activations,
                                          from_ggml_bytes, parse_format, quantize, quantize_blocks,
                                          to_ggml_bytes)

# The built-in formats: importing a module registers its format (registration order is the
# order of every list derived from the registry).
from alpaca_jax.quant.formats import q8_0, q4_0, q4_1, generic  # noqa: E402,F401  isort: skip
from alpaca_jax.quant.formats import q5_0, q5_1, kquants  # noqa: E402,F401  isort: skip

GGML_TYPES = exportable_formats()   # ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q6_k", ...)

__all__ = ["Format", "GGMLFormat", "Quantized", "register_format", "register_family",
           "get_format", "parse_format", "registered_formats", "exportable_formats",
           "format_for_ggml_type", "GGML_TYPES", "BLOCK", "roundf", "quantize", "quantize_blocks",
           "dequantize_blocks", "fake_quant", "fake_quant_activations", "to_ggml_bytes",
           "from_ggml_bytes"]
