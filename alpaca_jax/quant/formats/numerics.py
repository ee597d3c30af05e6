"""Float32 arithmetic that rounds exactly as ggml's C reference (and the `gguf` package's numpy
port) does, under XLA:CPU. Shared by every format module: each helper exists because XLA's
default lowering moved codes across a rounding boundary (`tests/test_quant.py` fails without it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def roundf(x):
    """C's roundf (half away from zero), written as the `gguf` package's `np_roundf` so every
    intermediate rounds the same way. `jnp.round` rounds half to even: wrong here."""
    a = jnp.abs(x)
    fl = jnp.floor(a)
    return jnp.sign(x) * (fl + jnp.floor(2 * (a - fl)))


def div_const(a, c):
    """`a / c` correctly rounded for a literal `c`. XLA rewrites a division by a constant as a
    multiplication by its reciprocal (1 ulp off for many blocks); a full-shape divisor tied to
    `a` by a barrier hides the constant from that rewrite (a barrier on the scalar alone does
    not)."""
    a, c = jax.lax.optimization_barrier((a, jnp.full_like(a, c)))
    return a / c


def trunc_add(p, offset: float, scale_bits: int = 26):
    """`trunc(fl(p + offset))` for float32 `p` with `p + offset >= 0`, as ggml's C and numpy
    compute it: the product `p` rounded to float32 first, then the sum rounded to float32.

    XLA:CPU always lets LLVM contract `x * inv + offset` into a fused multiply-add, which skips
    the first rounding and moves codes across a boundary (seen on SmolLM2's real weights;
    `tests/test_smollm2.py` checks them), and optimization barriers are stripped before codegen. So
    the sum is done in integers: `p * 2^26` is an exact integer whenever |p| >= 1/8 (a float32
    has 24 significant bits and |p| < 32), and float32 rounding of the sum (to nearest, ties to
    even) is applied to that integer. For |p| < 1/8 the result is `floor(offset)` outright.
    `scale_bits=25` takes sums up to 64 (Q5_0's `p + 16.5` reaches 32.5), exact for |p| >= 1/4;
    below that, `floor(offset)` again (the sum is within 1/4 of an offset ending in .5)."""
    small = jnp.abs(p) < 2.0 ** (23 - scale_bits)
    P = (jnp.where(small, jnp.float32(0), p) * jnp.float32(2.0 ** scale_bits)).astype(jnp.int32)
    S = P + jnp.int32(int(offset * 2 ** scale_bits))
    bits = 32 - jax.lax.clz(S)
    shift = jnp.maximum(bits - 24, 0)           # float32 keeps 24 significant bits of S
    u = jnp.left_shift(jnp.int32(1), shift)
    r = jnp.bitwise_and(S, u - 1)
    base = S - r
    half = jnp.right_shift(u, 1)
    odd = jnp.bitwise_and(jnp.right_shift(base, shift), 1) == 1
    up = (shift > 0) & ((r > half) | ((r == half) & odd))
    rounded = base + jnp.where(up, u, 0)
    code = jnp.right_shift(rounded, scale_bits).astype(jnp.float32)
    return jnp.where(small, jnp.float32(np.floor(offset)), code)


def safe_inv(d):
    """ggml's `id = d ? 1.0f/d : 0.0f`."""
    return jnp.where(d == 0, jnp.float32(0), jnp.float32(1) / jnp.where(d == 0, 1, d))
