"""GGML Q4_0: blocks of 32, one fp16 scale, 4-bit codes (18 bytes: d, qs[16]).

ggml's reference quantizer (`quantize_row_q4_0_ref`): `d = max / -8` (max = the signed value of
largest magnitude, the first one on ties); codes `trunc(x * (1/d) + 8.5)` clipped to [0, 15];
value `(q - 8) * f32(f16(d))`. The one format here that clips: the side opposite the largest
magnitude can exceed code 15, so the straight-through gradient is cut there."""
from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np

from alpaca_jax.quant.formats.base import GGMLFormat, Quantized, register_format
from alpaca_jax.quant.formats.layout import (f16_bytes, f16_from_bytes, pack_nibbles,
                                             unpack_nibbles)
from alpaca_jax.quant.formats.numerics import div_const, safe_inv, trunc_add


def _signed_max(xb):
    imax = jnp.argmax(jnp.abs(xb), axis=-1)[..., None]
    return jnp.take_along_axis(xb, imax, axis=-1)[..., 0]


@register_format
class Q4_0(GGMLFormat):
    name = "q4_0"
    block = 32
    ggml_type = gguf.GGMLQuantizationType.Q4_0
    type_size = 18
    file_type = gguf.LlamaFileType.MOSTLY_Q4_0

    def quantize_blocks(self, xb) -> Quantized:
        d = div_const(_signed_max(xb), -8)
        q = trunc_add(xb * safe_inv(d)[..., None], 8.5)
        return Quantized(self.name, jnp.clip(q, 0, 15).astype(jnp.uint8), d.astype(jnp.float16))

    def dequantize(self, q: Quantized):
        return ((q.codes.astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32)
                * q.d.astype(jnp.float32)[..., None])

    def in_range(self, xb):
        """Inside the grid's range, +- half a step: [-8.5 d, 7.5 d] (ordered by d's sign)."""
        d = div_const(_signed_max(xb)[..., None], -8)
        lo, hi = jnp.minimum(-8.5 * d, 7.5 * d), jnp.maximum(-8.5 * d, 7.5 * d)
        return (xb >= lo) & (xb <= hi)

    def pack(self, q: Quantized) -> np.ndarray:
        codes = np.asarray(q.codes)
        return np.concatenate([f16_bytes(q.d, codes.shape[:-1]), pack_nibbles(codes)], axis=-1)

    def unpack(self, blocks: np.ndarray) -> Quantized:
        return Quantized(self.name, unpack_nibbles(blocks[..., 2:]),
                         f16_from_bytes(blocks[..., :2]))
