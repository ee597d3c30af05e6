"""The format-independent operations, each dispatched to the registered format object:
quantize, dequantize, fake-quantize with a straight-through gradient, ggml bytes both ways.

Every function takes the block axis (the contracted axis) explicitly, so `[in, out]` kernels are
quantized without a transpose.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from alpaca_jax.model.remat import QUANT_CODES  # kept by every remat policy and QAT's matmul
from alpaca_jax.quant.formats.activations import q8_activations
from alpaca_jax.quant.formats.base import Format, Quantized, get_format
from alpaca_jax.quant.formats.layout import from_blocks, to_blocks


def parse_format(name: str | Format) -> Format:
    """The format called `name` (case-insensitive), or a ValueError listing the valid names."""
    return get_format(name)


def quantize_blocks(xb, fmt: str | Format) -> Quantized:
    """Quantize `[..., n_blocks, block]` blocks (cast to float32 first)."""
    return get_format(fmt).quantize_blocks(xb.astype(jnp.float32))


def dequantize_blocks(q: Quantized) -> jax.Array:
    """float32 `[..., n_blocks, block]` values of `q`."""
    return get_format(q.fmt).dequantize(q)


def quantize(x, fmt: str | Format, axis: int = 0) -> Quantized:
    """Codes and scales of `x` with blocks along `axis` (the contracted axis: 0 for an
    `[in, out]` kernel, -1 for the `[V, D]` embedding)."""
    fmt = get_format(fmt)
    return quantize_blocks(to_blocks(jnp.asarray(x), axis, fmt.block), fmt)


def _qdq(x, fmt: Format, axis: int):
    xb = to_blocks(x, axis, fmt.block)
    deq = fmt.dequantize(quantize_blocks(xb, fmt))
    ok = fmt.in_range(xb)
    return (from_blocks(deq, axis, x.ndim).astype(x.dtype),
            None if ok is None else from_blocks(ok, axis, x.ndim))




@jax.custom_vjp
def _straight_through(x, y):
    """`y` (the quantized `x`), with the gradient passed to `x` unchanged."""
    return y


_straight_through.defvjp(lambda x, y: (y, None),
                         lambda _, g: (g, jnp.zeros_like(g)))


def fake_quant(x, fmt: str | Format, axis: int = 0):
    """Quantize and dequantize `x` (blocks along `axis`), with a straight-through estimator:
    the gradient passes unchanged where `x` is inside the format's range, zero where it was
    clipped (`Format.in_range`). For GGML types the value equals
    `gguf.quants.dequantize(gguf.quants.quantize(x.T, T), T).T` bit for bit (axis 0)."""
    fmt = get_format(fmt)
    if fmt.costly_quantizer:
        # codes and scales named, outside any custom_vjp, so a remat policy can keep them:
        # the backward then re-runs only the (cheap) dequantizer
        xb = to_blocks(jax.lax.stop_gradient(x), axis, fmt.block)
        q = jax.tree.map(lambda a: checkpoint_name(a, QUANT_CODES), quantize_blocks(xb, fmt))
        return _straight_through(x, from_blocks(fmt.dequantize(q), axis, x.ndim).astype(x.dtype))

    @jax.custom_vjp
    def fq(x):
        return _qdq(x, fmt, axis)[0]

    def bwd(ok, g):
        return (g if ok is None else jnp.where(ok, g, jnp.zeros((), g.dtype)),)

    fq.defvjp(lambda x: _qdq(x, fmt, axis), bwd)
    return fq(x)


def fake_quant_activations(x, fmt: str | Format | None = None):
    """llama.cpp's rounding of a matmul input (last axis contracted) before its product with a
    weight of `fmt` (default: the 8-bit blocks of 32 of Q8_0/Q4_0/Q4_1). Identity gradient."""
    return q8_activations(x) if fmt is None else get_format(fmt).fake_quant_activations(x)


def to_ggml_bytes(q: Quantized) -> np.ndarray:
    """ggml's block bytes for a GGML-typed `Quantized` with blocks `[..., n_blocks, block]`:
    rows `[..., n_blocks * type_size]` uint8, what `gguf.quants.quantize` returns and a GGUF
    stores."""
    return get_format(q.fmt).to_bytes(q)


def from_ggml_bytes(raw: np.ndarray, fmt: str | Format) -> Quantized:
    """Inverse of `to_ggml_bytes`: ggml rows `[..., row_bytes]` uint8 -> codes and scales
    (numpy arrays), for GGUF import."""
    return get_format(fmt).from_bytes(raw)
