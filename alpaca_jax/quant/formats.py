"""Weight quantizers in JAX, bit-exact with the deployment formats.

GGML block types follow the reference quantizers in ggml (the `gguf` package's `quants` module is
the test oracle): blocks of 32 along the contracted axis, scales stored as fp16.
- Q8_0: `d = amax / 127`; codes `roundf(x * (1/d))` (half away from zero); `q * f32(f16(d))`.
- Q4_0: `d = max / -8` (max = the signed value of largest magnitude, first one on ties);
  codes `trunc(x * (1/d) + 8.5)` clipped to [0, 15]; `(q - 8) * f32(f16(d))`.
- Q4_1: `d = (max - min) / 15`; codes `trunc((x - min) * (1/d) + 0.5)` clipped to [0, 15];
  `q * f32(f16(d)) + f32(f16(min))`.
Generic symmetric integer formats for ablations (not a GGUF type): `int8_channel`, `int4_channel`
(one fp32 scale per output channel) and `int8_g<N>`, `int4_g<N>` (per group of N along the
contracted axis): `s = amax / qmax`, codes `roundf(x / s)` in [-qmax, qmax].

Every function takes the block axis (the contracted axis) explicitly, so `[in, out]` kernels are
quantized without a transpose.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

GGML_TYPES = ("q8_0", "q4_0", "q4_1")
BLOCK = 32
_GENERIC = re.compile(r"^int(8|4)_(channel|g(\d+))$")


@dataclass(frozen=True)
class Format:
    name: str          # canonical lower-case name
    block: int | None  # elements per scale along the contracted axis; None = the whole axis
    ggml: bool         # a GGUF tensor type (fp16 scales, ggml's rules)


def parse_format(name: str) -> Format:
    """The format called `name` (case-insensitive), or a ValueError listing the valid names."""
    key = str(name).lower()
    if key in GGML_TYPES:
        return Format(key, BLOCK, True)
    m = _GENERIC.match(key)
    if m:
        block = None if m.group(2) == "channel" else int(m.group(3))
        if block is not None and block < 1:
            raise ValueError(f"quant format {name!r}: the group size must be >= 1")
        return Format(key, block, False)
    raise ValueError(f"unknown quant format {name!r}; valid: {', '.join(GGML_TYPES)}, "
                     "int8_channel, int4_channel, int8_g<N>, int4_g<N> (e.g. int4_g32)")


def roundf(x):
    """C's roundf (half away from zero), written as the `gguf` package's `np_roundf` so every
    intermediate rounds the same way. `jnp.round` rounds half to even: wrong here."""
    a = jnp.abs(x)
    fl = jnp.floor(a)
    return jnp.sign(x) * (fl + jnp.floor(2 * (a - fl)))


def _div(a, c):
    """`a / c` correctly rounded for a literal `c`. XLA rewrites a division by a constant as a
    multiplication by its reciprocal (1 ulp off for many blocks); a full-shape divisor tied to
    `a` by a barrier hides the constant from that rewrite (a barrier on the scalar alone does
    not). `tests/test_quant.py` fails without it."""
    a, c = jax.lax.optimization_barrier((a, jnp.full_like(a, c)))
    return a / c


def _trunc_add(p, offset: float):
    """`trunc(fl(p + offset))` for float32 `p` with `p + offset >= 0`, as ggml's C and numpy
    compute it: the product `p` rounded to float32 first, then the sum rounded to float32.

    XLA:CPU always lets LLVM contract `x * inv + offset` into a fused multiply-add, which skips
    the first rounding and moves codes across a boundary (seen on SmolLM2's real weights;
    `tests/test_smollm2.py` checks them), and optimization barriers are stripped before codegen. So
    the sum is done in integers: `p * 2^26` is an exact integer whenever |p| >= 1/8 (a float32
    has 24 significant bits and |p| < 32), and float32 rounding of the sum (to nearest, ties to
    even) is applied to that integer. For |p| < 1/8 the result is `floor(offset)` outright."""
    small = jnp.abs(p) < 0.125
    P = (jnp.where(small, jnp.float32(0), p) * jnp.float32(2.0 ** 26)).astype(jnp.int32)
    S = P + jnp.int32(int(offset * 2 ** 26))
    bits = 32 - jax.lax.clz(S)
    shift = jnp.maximum(bits - 24, 0)           # float32 keeps 24 significant bits of S
    u = jnp.left_shift(jnp.int32(1), shift)
    r = jnp.bitwise_and(S, u - 1)
    base = S - r
    half = jnp.right_shift(u, 1)
    odd = jnp.bitwise_and(jnp.right_shift(base, shift), 1) == 1
    up = (shift > 0) & ((r > half) | ((r == half) & odd))
    rounded = base + jnp.where(up, u, 0)
    code = jnp.right_shift(rounded, 26).astype(jnp.float32)
    return jnp.where(small, jnp.float32(np.floor(offset)), code)


def _inv(d):
    return jnp.where(d == 0, jnp.float32(0), jnp.float32(1) / jnp.where(d == 0, 1, d))


def _blocks(x, axis, block):
    """Move `axis` last and split it into `[n/block, block]`."""
    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    if block is None:
        block = n
    if n % block:
        raise ValueError(f"the contracted dimension {n} is not a multiple of the block size "
                         f"{block}")
    return x.reshape(*x.shape[:-1], n // block, block)


def _unblock(xb, axis, ndim):
    x = xb.reshape(*xb.shape[:-2], -1)
    return jnp.moveaxis(x, -1, axis % ndim)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "d", "m"],
                   meta_fields=["fmt"])
@dataclass
class Quantized:
    """Integer codes and scales of one tensor, blocks along the last axis of `codes`
    (`[..., n_blocks, block]`): `d` (and `m` for Q4_1) `[..., n_blocks]`. For GGML types `d`/`m`
    are float16 and `codes` are ggml's stored values (Q8_0: int8; Q4_x: 0..15 as uint8)."""
    fmt: str
    codes: jax.Array
    d: jax.Array
    m: jax.Array | None = None


def quantize_blocks(xb, fmt: Format) -> Quantized:
    """Quantize `[..., n_blocks, block]` float32 blocks."""
    xb = xb.astype(jnp.float32)
    if fmt.name == "q8_0":
        d = _div(jnp.max(jnp.abs(xb), axis=-1), 127)
        q = roundf(xb * _inv(d)[..., None])
        return Quantized("q8_0", q.astype(jnp.int8), d.astype(jnp.float16))
    if fmt.name == "q4_0":
        imax = jnp.argmax(jnp.abs(xb), axis=-1)[..., None]
        mx = jnp.take_along_axis(xb, imax, axis=-1)[..., 0]
        d = _div(mx, -8)
        q = _trunc_add(xb * _inv(d)[..., None], 8.5)
        return Quantized("q4_0", jnp.clip(q, 0, 15).astype(jnp.uint8), d.astype(jnp.float16))
    if fmt.name == "q4_1":
        mx, mn = jnp.max(xb, axis=-1), jnp.min(xb, axis=-1)
        d = _div(mx - mn, 15)
        q = _trunc_add((xb - mn[..., None]) * _inv(d)[..., None], 0.5)
        return Quantized("q4_1", jnp.clip(q, 0, 15).astype(jnp.uint8), d.astype(jnp.float16),
                         mn.astype(jnp.float16))
    qmax = 127 if fmt.name.startswith("int8") else 7
    s = _div(jnp.max(jnp.abs(xb), axis=-1), qmax)
    q = jnp.clip(roundf(xb * _inv(s)[..., None]), -qmax, qmax)
    return Quantized(fmt.name, q.astype(jnp.int8), s)


def dequantize_blocks(q: Quantized) -> jax.Array:
    d = q.d.astype(jnp.float32)[..., None]
    if q.fmt == "q4_0":
        return (q.codes.astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32) * d
    if q.fmt == "q4_1":
        prod = q.codes.astype(jnp.float32) * d
        # q (4 bits) * d (fp16, 11 bits) is exact in float32, so a fused multiply-add cannot
        # change the sum
        return prod + q.m.astype(jnp.float32)[..., None]
    return q.codes.astype(jnp.float32) * d


def quantize(x, fmt: str | Format, axis: int = 0) -> Quantized:
    """Codes and scales of `x` with blocks along `axis` (the contracted axis: 0 for an
    `[in, out]` kernel, -1 for the `[V, D]` embedding)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    return quantize_blocks(_blocks(jnp.asarray(x), axis, fmt.block), fmt)


def _qdq(x, fmt: Format, axis: int):
    xb = _blocks(x, axis, fmt.block)
    deq = dequantize_blocks(quantize_blocks(xb, fmt))
    return _unblock(deq, axis, x.ndim).astype(x.dtype), _in_range(xb, fmt, axis, x.ndim)


def _in_range(xb, fmt: Format, axis, ndim):
    """Where the straight-through gradient passes: inside the grid's range (+- half a step).
    Only Q4_0 clips values (the side opposite the largest magnitude can exceed code 15)."""
    if fmt.name != "q4_0":
        return None
    imax = jnp.argmax(jnp.abs(xb), axis=-1)[..., None]
    mx = jnp.take_along_axis(xb, imax, axis=-1)
    d = _div(mx, -8)
    lo, hi = jnp.minimum(-8.5 * d, 7.5 * d), jnp.maximum(-8.5 * d, 7.5 * d)
    ok = (xb >= lo) & (xb <= hi)
    return _unblock(ok, axis, ndim)


def fake_quant(x, fmt: str | Format, axis: int = 0):
    """Quantize and dequantize `x` (blocks along `axis`), with a straight-through estimator:
    the gradient passes unchanged where `x` is inside the format's range, zero where it was
    clipped. For GGML types the value equals
    `gguf.quants.dequantize(gguf.quants.quantize(x.T, T), T).T` bit for bit (axis 0)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt

    @jax.custom_vjp
    def fq(x):
        return _qdq(x, fmt, axis)[0]

    def fwd(x):
        y, ok = _qdq(x, fmt, axis)
        return y, ok

    def bwd(ok, g):
        return (g if ok is None else jnp.where(ok, g, jnp.zeros((), g.dtype)),)

    fq.defvjp(fwd, bwd)
    return fq(x)


def fake_quant_activations(x):
    """llama.cpp's CPU path quantizes the activations entering a Q8_0/Q4_0/Q4_1 matmul to 8-bit
    blocks of 32 along the contracted (last) axis. Its SIMD quantizer (x86 AVX, ARM NEON) uses
    `id = 127 / amax` and rounds half to even, unlike the reference weight quantizer; this
    follows the SIMD path. Straight-through gradient."""
    def qdq(x):
        xb = _blocks(x.astype(jnp.float32), -1, BLOCK)
        amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
        d = _div(amax, 127)
        inv = jnp.where(amax == 0, jnp.float32(0),
                        jnp.float32(127) / jnp.where(amax == 0, 1, amax))
        q = jnp.round(xb * inv)  # round half to even, as _mm256_round_ps / vcvtnq
        deq = q * d.astype(jnp.float16).astype(jnp.float32)
        return _unblock(deq, -1, x.ndim).astype(x.dtype)
    return _ste(qdq)(x)


def _ste(f):
    """`f` forward, identity backward (exact forward value, unlike `x + stop_gradient(f(x)-x)`,
    which rounds)."""
    @jax.custom_vjp
    def g(x):
        return f(x)
    g.defvjp(lambda x: (f(x), None), lambda _, ct: (ct,))
    return g


def to_ggml_bytes(q: Quantized) -> np.ndarray:
    """ggml's block bytes for a GGML-typed `Quantized` with blocks `[..., n_blocks, 32]`: rows
    `[..., n_blocks * type_size]` uint8, what `gguf.quants.quantize` returns and a GGUF stores."""
    codes, d = np.asarray(q.codes), np.asarray(q.d, np.float16)
    lead = codes.shape[:-1]
    d_bytes = d.reshape(*lead, 1).view(np.uint8)
    if q.fmt == "q8_0":
        blocks = np.concatenate([d_bytes, codes.astype(np.int8).view(np.uint8)], axis=-1)
    elif q.fmt in ("q4_0", "q4_1"):
        c = codes.astype(np.uint8)
        packed = c[..., :16] | (c[..., 16:] << np.uint8(4))
        parts = [d_bytes]
        if q.fmt == "q4_1":
            parts.append(np.asarray(q.m, np.float16).reshape(*lead, 1).view(np.uint8))
        blocks = np.concatenate(parts + [packed], axis=-1)
    else:
        raise ValueError(f"{q.fmt} is not a GGML type; it has no GGUF byte layout")
    return np.ascontiguousarray(blocks.reshape(*lead[:-1], -1))
