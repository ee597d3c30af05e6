"""GGML Q8_0: blocks of 32, one fp16 scale, int8 codes (34 bytes: d, qs[32]).

ggml's reference quantizer (`quantize_row_q8_0_ref`): `d = amax / 127`, codes
`roundf(x * (1/d))` (half away from zero); value `q * f32(f16(d))`."""
from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np

from alpaca_jax.quant.formats.base import GGMLFormat, Quantized, register_format
from alpaca_jax.quant.formats.layout import f16_bytes, f16_from_bytes
from alpaca_jax.quant.formats.numerics import div_const, roundf, safe_inv


@register_format
class Q8_0(GGMLFormat):
    name = "q8_0"
    block = 32
    ggml_type = gguf.GGMLQuantizationType.Q8_0
    type_size = 34
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0

    def quantize_blocks(self, xb) -> Quantized:
        d = div_const(jnp.max(jnp.abs(xb), axis=-1), 127)
        q = roundf(xb * safe_inv(d)[..., None])
        return Quantized(self.name, q.astype(jnp.int8), d.astype(jnp.float16))

    def dequantize(self, q: Quantized):
        return q.codes.astype(jnp.float32) * q.d.astype(jnp.float32)[..., None]

    def pack(self, q: Quantized) -> np.ndarray:
        codes = np.asarray(q.codes, np.int8)
        return np.concatenate([f16_bytes(q.d, codes.shape[:-1]), codes.view(np.uint8)], axis=-1)

    def unpack(self, blocks: np.ndarray) -> Quantized:
        return Quantized(self.name, np.ascontiguousarray(blocks[..., 2:]).view(np.int8),
                         f16_from_bytes(blocks[..., :2]))
