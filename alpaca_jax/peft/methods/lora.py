"""LoRA (HF `peft.tuners.lora`, `use_dora=False`): `W + scale * a @ b`, run factored as
`x W + scale * dropout(x) a b`, so no full-size weight gradient is formed.

Leaves per kernel: `a` `[L, in, r]`, `b` `[L, r, out]` (kernels are `[in, out]`; PEFT's
`lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` are their transposes), plus the
settings `scale` `[L]` (alpha / r, or alpha / sqrt(r) for rsLoRA) and `dropout` `[L]`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.model.transform import matmul
from alpaca_jax.peft.methods.base import PeftMethod


def lora_weight(w, ad):
    """`W + scale * a @ b` in float32, any leading axes."""
    a, b = ad["a"].astype(jnp.float32), ad["b"].astype(jnp.float32)
    scale = jnp.asarray(ad["scale"], jnp.float32)[..., None, None]
    return w.astype(jnp.float32) + scale * jnp.einsum("...ir,...ro->...io", a, b)


@jax.custom_vjp
def _lowrank_2d(x, a, b):
    return (x @ a) @ b


def _lowrank_fwd(x, a, b):
    xa = x @ a
    return xa @ b, (x, a, b, xa)


def _lowrank_bwd(res, g):
    x, a, b, xa = res
    # The products autodiff would form, but written out: left to autodiff (on 3-D operands)
    # XLA:CPU fused the cotangent's elementwise producer into these skinny weight-gradient dots
    # and ran them far slower (RESULTS.md, "Train step"). The barrier was part of the measured
    # version; alone it makes little difference.
    g = jax.lax.optimization_barrier(g)
    g_xa = g @ b.T
    return g_xa @ a.T, x.T @ g_xa, xa.T @ g


_lowrank_2d.defvjp(_lowrank_fwd, _lowrank_bwd)


def lowrank(x, a, b):
    """`x @ a @ b` over flattened tokens (2-D dots: the 3-D form was slower on XLA:CPU)."""
    lead = x.shape[:-1]
    y = _lowrank_2d(x.reshape(-1, x.shape[-1]), a.astype(x.dtype), b.astype(x.dtype))
    return y.reshape(*lead, b.shape[-1])


def _dropout(x, rate, key):
    """Inverted dropout as torch's: zero with probability `rate`, scale the rest by 1/(1-rate).
    The mask compares raw 32-bit draws with `rate * 2^32` (cheaper on CPU than `bernoulli`'s
    float conversion, same distribution to 2^-32); on CPU a rate of 0 draws nothing."""
    def drop(x):
        threshold = (jnp.asarray(rate, jnp.float32) * 4294967296.0).astype(jnp.uint32)
        # the non-partitionable threefry layout draws faster on CPU; the masks are ours
        # alone (keyed by step), so the layout only has to be fixed, not JAX's default. (On
        # an H200, drawing with XLA's RngBitGenerator instead changed the LoRA step by <1%.)
        with jax.threefry_partitionable(False):
            keep = jax.random.bits(key, x.shape, jnp.uint32) >= threshold
        return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
    if jax.default_backend() != "cpu":
        # exact at rate 0 too (every draw >= 0, x / 1); a `cond` would cost a device-to-host
        # sync per adapter per layer on a GPU (LoRA step 101 -> 93 ms on an H200 at
        # SmolLM2's shape, RESULTS.md "On an NVIDIA H200")
        return drop(x)
    return jax.lax.cond(rate > 0, drop, lambda x: x, x)


class LoRA(PeftMethod):
    name = "lora"
    trainable = ("a", "b")
    hf_config = {"use_dora": False}
    hf_tensors = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def init(self, key, w, rank):
        """PEFT's: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0."""
        L, d_in, d_out = w.shape
        bound = 1.0 / math.sqrt(d_in)
        return {"a": jax.random.uniform(key, (L, d_in, rank), jnp.float32, -bound, bound),
                "b": jnp.zeros((L, rank, d_out), jnp.float32)}

    def neutral(self, w, rank):
        L, d_in, d_out = w.shape
        return {"a": np.zeros((L, d_in, rank), np.float32),
                "b": np.zeros((L, rank, d_out), np.float32)}

    def shapes(self, L, d_in, d_out, rank):
        return {"a": (L, d_in, rank), "b": (L, rank, d_out)}

    def rank(self, ad):
        return int(np.shape(ad["a"])[-1])

    def dropped(self, x, ad, rng):
        """The adapter's input: `x`, or with a key, `x` under the adapter's dropout."""
        return x if rng is None else _dropout(x, ad["dropout"], rng)

    def weight(self, w, ad):
        return lora_weight(w, ad).astype(w.dtype)

    def linear(self, x, w, ad, *, rng=None):
        xd = self.dropped(x, ad, rng)
        return matmul(x, w) + lowrank(xd, ad["a"], ad["b"]) * ad["scale"].astype(x.dtype)

    def to_hf(self, ad):
        return {"lora_A": np.ascontiguousarray(np.asarray(ad["a"]).T, np.float32),
                "lora_B": np.ascontiguousarray(np.asarray(ad["b"]).T, np.float32)}

    def from_hf(self, tensors, d_in, d_out, where):
        a, b = tensors["lora_A"], tensors["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out \
                or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: lora_A {a.shape} / lora_B {b.shape} do not fit the "
                             f"model's [{d_out}, {d_in}] weight (expected [r, {d_in}] and "
                             f"[{d_out}, r])")
        return {"a": a.astype(np.float32).T, "b": b.astype(np.float32).T}
