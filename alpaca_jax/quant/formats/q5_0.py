"""GGML Q5_0: blocks of 32, one fp16 scale, 5-bit codes (22 bytes: d, qh[4], qs[16]).

ggml's reference quantizer (`quantize_row_q5_0_ref`): `d = max / -16` (max = the signed value of
largest magnitude, the first on ties); codes `trunc(x * (1/d) + 16.5)` capped at 31; value
`(q - 16) * f32(f16(d))`. The low nibbles pack as Q4_0's; bit 4 of code j is bit j of `qh`.
llama.cpp's fallback for Q4_K tensors whose rows are not whole 256-blocks."""
from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np

from alpaca_jax.quant.formats.base import GGMLFormat, Quantized, register_format
from alpaca_jax.quant.formats.layout import (f16_bytes, f16_from_bytes, pack_fifth_bits,
                                             pack_nibbles, unpack_fifth_bits, unpack_nibbles)
from alpaca_jax.quant.formats.numerics import div_const, safe_inv, trunc_add
from alpaca_jax.quant.formats.q4_0 import _signed_max


@register_format
class Q5_0(GGMLFormat):
    name = "q5_0"
    block = 32
    ggml_type = gguf.GGMLQuantizationType.Q5_0
    type_size = 22
    file_type = gguf.LlamaFileType.MOSTLY_Q5_0

    def quantize_blocks(self, xb) -> Quantized:
        d = div_const(_signed_max(xb), -16)
        q = trunc_add(xb * safe_inv(d)[..., None], 16.5, scale_bits=25)   # sums reach 32.5
        return Quantized(self.name, jnp.clip(q, 0, 31).astype(jnp.uint8), d.astype(jnp.float16))

    def dequantize(self, q: Quantized):
        return ((q.codes.astype(jnp.int8) - jnp.int8(16)).astype(jnp.float32)
                * q.d.astype(jnp.float32)[..., None])

    def in_range(self, xb):
        """Inside the grid's range, +- half a step: [-16.5 d, 15.5 d] (ordered by d's sign)."""
        d = div_const(_signed_max(xb)[..., None], -16)
        lo, hi = jnp.minimum(-16.5 * d, 15.5 * d), jnp.maximum(-16.5 * d, 15.5 * d)
        return (xb >= lo) & (xb <= hi)

    def pack(self, q: Quantized) -> np.ndarray:
        codes = np.asarray(q.codes, np.uint8)
        return np.concatenate([f16_bytes(q.d, codes.shape[:-1]), pack_fifth_bits(codes),
                               pack_nibbles(codes & np.uint8(0x0F))], axis=-1)

    def unpack(self, blocks: np.ndarray) -> Quantized:
        codes = unpack_nibbles(blocks[..., 6:]) | unpack_fifth_bits(blocks[..., 2:6])
        return Quantized(self.name, codes, f16_from_bytes(blocks[..., :2]))
