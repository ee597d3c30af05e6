"""Quantization bit-exact with the deployment formats (GGUF Q8_0, Q4_0, Q4_1) plus generic
int8/int4 for ablations: fake quantizers with straight-through gradients, PTQ, the QAT transform,
and the codes export writes. Formats are objects in one registry (`quant/formats/`).

    from alpaca_jax.quant import fake_quant, quantize_params, QuantSpec, FakeQuant, ptq
    from alpaca_jax.quant import exportable_formats, get_format   # what a GGUF can hold
"""
from alpaca_jax.quant.formats import (GGML_TYPES, Format, Quantized, dequantize_blocks,
                                      exportable_formats, fake_quant, fake_quant_activations,
                                      get_format, parse_format, quantize, registered_formats)
from alpaca_jax.quant.qat import FakeQuant, ptq, quantize_params
from alpaca_jax.quant.spec import QuantSpec, resolve

__all__ = ["fake_quant", "fake_quant_activations", "quantize", "dequantize_blocks", "Quantized",
           "parse_format", "get_format", "Format", "registered_formats", "exportable_formats",
           "GGML_TYPES", "quantize_params", "ptq", "FakeQuant", "QuantSpec", "resolve"]
