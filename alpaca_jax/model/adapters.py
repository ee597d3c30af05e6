"""How a stored weight becomes the weight a matmul uses (the `materialize` hook), and low-rank
adapters (LoRA, DoRA) as the model computes with them.

Adapters live in the params tree beside the weights they adapt (docs/ARCHITECTURE.md, "The params tree"):

    params['layers']['lora'][target] = {
        'a': [L, in, r], 'b': [L, r, out],   # delta W = scale * a @ b  (kernels are [in, out])
        'scale': [L],                        # alpha / r, or alpha / sqrt(r) for rsLoRA
        'dropout': [L],                      # dropout rate on the adapter's input (training)
        'm': [L, out],                       # DoRA only: the magnitude vector
    }

so the tree describes itself: forward, generate, perplexity and training apply whatever adapters
it holds (the default transform, `adapted`), `merge` needs no side config, and depth pruning
drops adapter rows with the rest of the layer axis. The math follows HF PEFT (`peft.tuners.lora`):
LoRA adds `scale * dropout(x) @ a @ b`; DoRA rescales each output column of `W + scale*a@b` to
the magnitude `m`, with the column norm treated as a constant in the backward pass (DoRA paper
section 4.3, as PEFT does).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from alpaca_jax.model.params import LAYER_KERNELS

ADAPTERS = "lora"            # the key under params['layers']
RNG = "rng"                  # per-block dropout key that `forward(rng=...)` puts in each block
ADAPTER_WEIGHTS = ("a", "b", "m")   # trainable; 'scale' and 'dropout' are fixed settings


def matmul(x, w):
    """`x @ w` in x's dtype. When w is stored wider (fp32 master weights, bf16 compute) the cast
    happens inside `_cast_matmul`, whose backward re-casts from the stored weight: autodiff of
    `w.astype` would keep each layer's bf16 copy alive until the backward (0.5x the fp32 weights
    in residuals, more once XLA hoists the casts out of the layer loop)."""
    if w.dtype == x.dtype:
        return jnp.einsum("...i,io->...o", x, w)
    return _cast_matmul(x, w)


@jax.custom_vjp
def _cast_matmul(x, w):
    return jnp.einsum("...i,io->...o", x, w.astype(x.dtype))


def _cast_matmul_fwd(x, w):
    return _cast_matmul(x, w), (x, w)


def _cast_matmul_bwd(res, g):
    x, w = res
    dx = jnp.einsum("...o,io->...i", g, w.astype(g.dtype))
    dw = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32)
    return dx, dw.astype(w.dtype)


_cast_matmul.defvjp(_cast_matmul_fwd, _cast_matmul_bwd)


class Transform:
    """The `materialize` hook as an object: `weight(tree, name)` is the effective weight,
    `linear(x, tree, name)` computes `x @ W_eff`, possibly without forming `W_eff` (LoRA's
    factored path: no full-size weight gradient). Subclasses are frozen dataclasses, so they
    are hashable and can be static arguments of jitted functions."""

    def __call__(self, tree: dict, name: str) -> jax.Array:
        return self.weight(tree, name)

    def weight(self, tree: dict, name: str) -> jax.Array:
        return tree[name]

    def linear(self, x: jax.Array, tree: dict, name: str) -> jax.Array:
        return matmul(x, self.weight(tree, name))

    def tied_head(self, h: jax.Array, params: dict) -> jax.Array:
        """Logits through the tied embedding `[V, D]` (the head of tied models)."""
        return jnp.einsum("...d,vd->...v", h, self.weight(params, "embed").astype(h.dtype))


def adapter_of(tree: dict, name: str) -> dict | None:
    group = tree.get(ADAPTERS) if isinstance(tree, dict) else None
    return None if group is None else group.get(name)


def _col_norm(w_eff):
    """Per-output-feature norm of `[.., in, out]` (PEFT's norm over the input dim of `[out, in]`),
    a constant for autodiff as in PEFT's DoRA."""
    n = jnp.sqrt(jnp.sum(jnp.square(w_eff.astype(jnp.float32)), axis=-2))
    return jax.lax.stop_gradient(n)


def _lora_weight(w, ad):
    """`W + scale * a @ b` in float32, any leading axes."""
    a, b = ad["a"].astype(jnp.float32), ad["b"].astype(jnp.float32)
    scale = jnp.asarray(ad["scale"], jnp.float32)[..., None, None]
    return w.astype(jnp.float32) + scale * jnp.einsum("...ir,...ro->...io", a, b)


def effective_weight(w: jax.Array, ad: dict) -> jax.Array:
    """`W + scale * a @ b` (LoRA) or `m * (W + scale * a @ b) / ||.||_col` (DoRA), any leading
    axes (one layer or the stacked `[L, ...]`), computed in float32, returned in `w`'s dtype."""
    w_eff = _lora_weight(w, ad)
    if "m" in ad:
        w_eff = w_eff * (ad["m"].astype(jnp.float32) / _col_norm(w_eff))[..., None, :]
    return w_eff.astype(w.dtype)


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


def _lowrank(x, a, b):
    """`x @ a @ b` over flattened tokens (2-D dots: the 3-D form was slower on XLA:CPU)."""
    lead = x.shape[:-1]
    y = _lowrank_2d(x.reshape(-1, x.shape[-1]), a.astype(x.dtype), b.astype(x.dtype))
    return y.reshape(*lead, b.shape[-1])


def _dropout(x, rate, key):
    """Inverted dropout as torch's: zero with probability `rate`, scale the rest by 1/(1-rate).
    The mask compares raw 32-bit draws with `rate * 2^32` (cheaper on CPU than `bernoulli`'s
    float conversion, same distribution to 2^-32), and a rate of 0 draws nothing."""
    def drop(x):
        threshold = (jnp.asarray(rate, jnp.float32) * 4294967296.0).astype(jnp.uint32)
        # the non-partitionable threefry layout draws faster on CPU; the masks are ours
        # alone (keyed by step), so the layout only has to be fixed, not JAX's default
        with jax.threefry_partitionable(False):
            keep = jax.random.bits(key, x.shape, jnp.uint32) >= threshold
        return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
    return jax.lax.cond(rate > 0, drop, lambda x: x, x)


@dataclass(frozen=True)
class Adapted(Transform):
    """Stored weights plus whatever adapters the tree holds; the default everywhere.

    Adapter dropout is active only when the block carries a key (`forward(..., rng=key)`, which
    the training step passes); evaluation and generation are deterministic, as in PEFT's eval
    mode."""

    def weight(self, tree, name):
        ad = adapter_of(tree, name)
        return tree[name] if ad is None else effective_weight(tree[name], ad)

    def linear(self, x, tree, name):
        w, ad = tree[name], adapter_of(tree, name)
        if ad is None:
            return matmul(x, w)
        xd = x
        if RNG in tree:
            key = jax.random.fold_in(tree[RNG], LAYER_KERNELS.index(name))
            xd = _dropout(x, ad["dropout"], key)
        base = matmul(x, w)
        low = _lowrank(xd, ad["a"], ad["b"]) * ad["scale"].astype(x.dtype)
        if "m" not in ad:
            return base + low
        g = (ad["m"].astype(jnp.float32) / _col_norm(_lora_weight(w, ad))).astype(x.dtype)
        if xd is x:
            return g * (base + low)
        # PEFT with dropout: x @ W + (g - 1) * (dropout(x) @ W) + g * lora(dropout(x))
        return base + (g - 1) * matmul(xd, w) + g * low


adapted = Adapted()
