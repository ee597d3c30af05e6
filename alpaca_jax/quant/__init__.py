"""Quantization bit-exact with the deployment formats (GGUF Q8_0, Q4_0, Q4_1) plus generic
int8/int4 for ablations: fake quantizers with straight-through gradients, PTQ, the QAT transform,
and the codes export writes.

    from alpaca_jax.quant import fake_quant, quantize_params, QuantSpec, FakeQuant, ptq
"""
from alpaca_jax.quant.formats import (Quantized, dequantize_blocks, fake_quant,
                                      fake_quant_activations, parse_format, quantize)
from alpaca_jax.quant.qat import FakeQuant, ptq, quantize_params
from alpaca_jax.quant.spec import QuantSpec, resolve

__all__ = ["fake_quant", "fake_quant_activations", "quantize", "dequantize_blocks", "Quantized",
           "parse_format", "quantize_params", "ptq", "FakeQuant", "QuantSpec", "resolve"]
