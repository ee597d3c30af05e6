"""Generic symmetric integer formats for ablations, not GGUF types (not exportable):
`int8_channel`, `int4_channel` (one fp32 scale per output channel: the whole contracted axis)
and `int8_g<N>`, `int4_g<N>` (a scale per group of N along the contracted axis).
`s = amax / qmax`, codes `roundf(x / s)` in [-qmax, qmax] (qmax 127 or 7). Registered as a
family: any group size is a valid name."""
from __future__ import annotations

import jax.numpy as jnp

from alpaca_jax.quant.formats.base import Format, Quantized, register_family
from alpaca_jax.quant.formats.numerics import div_const, roundf, safe_inv


class SymmetricInt(Format):
    def __init__(self, name: str, bits: int, block: int | None):
        self.name, self.block = name, block
        self.qmax = 127 if bits == 8 else 7

    def quantize_blocks(self, xb) -> Quantized:
        s = div_const(jnp.max(jnp.abs(xb), axis=-1), self.qmax)
        q = jnp.clip(roundf(xb * safe_inv(s)[..., None]), -self.qmax, self.qmax)
        return Quantized(self.name, q.astype(jnp.int8), s)

    def dequantize(self, q: Quantized):
        return q.codes.astype(jnp.float32) * q.d.astype(jnp.float32)[..., None]


def _make(m) -> SymmetricInt:
    block = None if m.group(2) == "channel" else int(m.group(3))
    if block is not None and block < 1:
        raise ValueError(f"quant format {m.group(0)!r}: the group size must be >= 1")
    return SymmetricInt(m.group(0), int(m.group(1)), block)


register_family(r"int(8|4)_(channel|g(\d+))", _make,
                "int8_channel, int4_channel, int8_g<N>, int4_g<N> (e.g. int4_g32)")
