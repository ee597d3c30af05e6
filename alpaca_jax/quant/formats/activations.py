"""llama.cpp's rounding of matmul inputs, for QAT/PTQ runs that emulate the CPU runtime
(`QuantSpec(activations=True)`). A format returns its own from `Format.fake_quant_activations`
(llama.cpp's `vec_dot_type` for that weight type); the formats here all use this one."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from alpaca_jax.quant.formats.layout import from_blocks, to_blocks
from alpaca_jax.quant.formats.numerics import div_const

QK8 = 32   # Q8_0/Q8_1 activation blocks


def _q8_blocks(x):
    """`(codes, d)` of llama.cpp's SIMD Q8_0/Q8_1 quantizer: blocks `[..., n, 32]` of x along
    its last axis, codes `round(x * (127 / amax))` (half to even, as _mm256_round_ps / vcvtnq)
    and the float32 scale `d = amax / 127` `[..., n, 1]`."""
    xb = to_blocks(x.astype(jnp.float32), -1, QK8)
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    inv = jnp.where(amax == 0, jnp.float32(0), jnp.float32(127) / jnp.where(amax == 0, 1, amax))
    return jnp.round(xb * inv), div_const(amax, 127)


def q8_activations(x):
    """llama.cpp's CPU path quantizes the activations entering a Q8_0/Q4_0/Q4_1 matmul to 8-bit
    blocks of 32 along the contracted (last) axis. Its SIMD quantizer (x86 AVX, ARM NEON) uses
    `id = 127 / amax` and rounds half to even, unlike the reference weight quantizer; this
    follows the SIMD path. Straight-through gradient."""
    def qdq(x):
        q, d = _q8_blocks(x)
        deq = q * d.astype(jnp.float16).astype(jnp.float32)
        return from_blocks(deq, -1, x.ndim).astype(x.dtype)
    return ste(qdq)(x)


def q8_1_sum_error(x):
    """What llama.cpp's Q8_1 activation blocks (the `vec_dot_type` of Q4_1/Q5_1) add to a matmul
    beyond `q8_activations(x)`, per block of 32: the weight's block minimum `m` enters the dot
    product as `m * s`, with `s = fp16(d * sum(q))` stored in the block (`d` the float32 scale,
    `quantize_row_q8_1`), where `q8_activations(x) @ w` gives `m * fp16(d) * sum(q)`. Returns
    `s - fp16(d) * sum(q)`, `[..., n_blocks]` float32, no gradient (the straight-through
    estimator of `q8_activations` already carries it)."""
    q, d = _q8_blocks(jax.lax.stop_gradient(x))
    qsum, d = jnp.sum(q, axis=-1), d[..., 0]    # integers: the sum is exact
    s = (d * qsum).astype(jnp.float16).astype(jnp.float32)
    return s - d.astype(jnp.float16).astype(jnp.float32) * qsum


def q8_1_matmul(x, w, contract: int, product):
    """`product` (= `q8_activations(x) @ w`) plus the Q8_1 block-sum term of `q8_1_sum_error`,
    for a weight `w` already on a Q4_1/Q5_1 grid: the minimum of each of its dequantized blocks
    is the block's fp16 `m` exactly (the smallest value always takes code 0)."""
    mins = jnp.min(to_blocks(jax.lax.stop_gradient(w).astype(jnp.float32), contract, QK8),
                   axis=-1)                                          # [out, n_blocks]
    fix = jnp.einsum("...b,ob->...o", q8_1_sum_error(x), mins)
    return product + fix.astype(product.dtype)


def ste(f):
    """`f` forward, identity backward (exact forward value, unlike `x + stop_gradient(f(x)-x)`,
    which rounds)."""
    @jax.custom_vjp
    def g(x):
        return f(x)
    g.defvjp(lambda x: (f(x), None), lambda _, ct: (ct,))
    return g


QK_K = 256  # Q8_K activation blocks (the K-quants' vec_dot_type)


def q8k_activations(x):
    """llama.cpp's rounding of the activations entering a K-quant (Q4_K/Q5_K/Q6_K) matmul:
    Q8_K, blocks of 256 along the contracted axis (`quantize_row_q8_K_ref`): `iscale = -127 /
    max` (max = the signed value of largest magnitude, the first on ties), codes
    `min(127, nearest_int(iscale * x))` (round half to even), value `q * (1 / iscale)` with a
    float32 scale (not fp16, unlike Q8_0). Straight-through gradient."""
    def qdq(x):
        xb = to_blocks(x.astype(jnp.float32), -1, QK_K)
        imax = jnp.argmax(jnp.abs(xb), axis=-1)[..., None]
        mx = jnp.take_along_axis(xb, imax, axis=-1)
        zero = mx == 0
        iscale = jnp.float32(-127) / jnp.where(zero, jnp.float32(1), mx)
        # XLA folds 1 / (-127 / mx) into mx / -127 (1 ulp off ggml's two roundings) unless the
        # quotient is hidden behind a barrier
        iscale = jax.lax.optimization_barrier(iscale)
        # ggml keeps codes as ints (no -0): a zero code times a negative d is -0
        q = jnp.minimum(jnp.round(iscale * xb), 127).astype(jnp.int32).astype(jnp.float32)
        deq = jnp.where(zero, jnp.float32(0), q * (jnp.float32(1) / iscale))
        return from_blocks(deq, -1, x.ndim).astype(x.dtype)
    return ste(qdq)(x)
