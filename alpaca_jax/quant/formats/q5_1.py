"""GGML Q5_1: blocks of 32, fp16 scale and minimum, 5-bit codes (24 bytes: d, m, qh[4], qs[16]).

ggml's reference quantizer (`quantize_row_q5_1_ref`): `d = (max - min) / 31`; codes
`trunc((x - min) * (1/d) + 0.5)` (never above 31); value `q * f32(f16(d)) + f32(f16(min))`.
llama.cpp's fallback for Q5_K tensors whose rows are not whole 256-blocks."""
from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np

from alpaca_jax.quant.formats.activations import q8_1_matmul
from alpaca_jax.quant.formats.base import GGMLFormat, Quantized, register_format
from alpaca_jax.quant.formats.layout import (f16_bytes, f16_from_bytes, pack_fifth_bits,
                                             pack_nibbles, unpack_fifth_bits, unpack_nibbles)
from alpaca_jax.quant.formats.numerics import div_const, safe_inv, trunc_add


@register_format
class Q5_1(GGMLFormat):
    name = "q5_1"
    block = 32
    ggml_type = gguf.GGMLQuantizationType.Q5_1
    type_size = 24
    file_type = gguf.LlamaFileType.MOSTLY_Q5_1

    def quantize_blocks(self, xb) -> Quantized:
        mx, mn = jnp.max(xb, axis=-1), jnp.min(xb, axis=-1)
        d = div_const(mx - mn, 31)
        q = trunc_add((xb - mn[..., None]) * safe_inv(d)[..., None], 0.5)
        return Quantized(self.name, jnp.clip(q, 0, 31).astype(jnp.uint8), d.astype(jnp.float16),
                         mn.astype(jnp.float16))

    def dequantize(self, q: Quantized):
        prod = q.codes.astype(jnp.float32) * q.d.astype(jnp.float32)[..., None]
        # q (5 bits) * d (fp16, 11 bits) is exact in float32: an FMA cannot change the sum
        return prod + q.m.astype(jnp.float32)[..., None]

    def emulated_matmul(self, x, w, contract: int):
        # llama.cpp pairs this format with Q8_1 activations, whose stored block sums are rounded
        return q8_1_matmul(x, w, contract, super().emulated_matmul(x, w, contract))

    def pack(self, q: Quantized) -> np.ndarray:
        codes = np.asarray(q.codes, np.uint8)
        lead = codes.shape[:-1]
        return np.concatenate([f16_bytes(q.d, lead), f16_bytes(q.m, lead),
                               pack_fifth_bits(codes), pack_nibbles(codes & np.uint8(0x0F))],
                              axis=-1)

    def unpack(self, blocks: np.ndarray) -> Quantized:
        codes = unpack_nibbles(blocks[..., 8:]) | unpack_fifth_bits(blocks[..., 4:8])
        return Quantized(self.name, codes, f16_from_bytes(blocks[..., :2]),
                         f16_from_bytes(blocks[..., 2:4]))
