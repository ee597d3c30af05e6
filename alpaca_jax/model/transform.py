"""The transform protocol: how a stored weight meets an activation (the `materialize` argument of
`forward` and of everything that calls it).

A `Transform` has three methods, all given the tree that holds the weight (a block's slice of
`params['layers']`, or the whole params for `embed` / `lm_head`) and the weight's name in it:

    weight(tree, name)                 -> the effective weight (what merging would store)
    linear(x, tree, name, *, rng=None) -> x @ weight(tree, name), possibly without forming it
                                          (LoRA's factored path); `rng` is a PRNG key for
                                          stochastic transforms (adapter dropout in training),
                                          None for a deterministic pass
    tied_head(h, params)               -> logits through a tied embedding `[V, D]`

Randomness reaches a transform only through `rng`: `forward(rng=key)` folds in the block index
and the block folds in the kernel's index (`model/forward.py`); nothing is stored in the params.
Transforms are frozen dataclasses (hashable, so static under jit) and compose by wrapping an
inner transform (`quant/qat.py: FakeQuant`, `train/distill.py: _HeadOff`). The base class is the
plain transform: the stored weight, as is. `identity` ignores adapters in the tree; the default
everywhere is `adapted` (`model/adapters.py`), which applies them.

Which weight a name denotes, and its flat key (`layers/wq`, `embed`), is `WeightName`
(`model/params.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


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
    """The protocol (see the module docstring), with the plain behaviour as defaults: a subclass
    overrides `weight` alone when its `linear` may form the weight, or both."""

    def weight(self, tree: dict, name: str) -> jax.Array:
        return tree[name]

    def linear(self, x: jax.Array, tree: dict, name: str, *, rng=None) -> jax.Array:
        return matmul(x, self.weight(tree, name))

    def tied_head(self, h: jax.Array, params: dict) -> jax.Array:
        """Logits through the tied embedding `[V, D]` (the head of tied models)."""
        return jnp.einsum("...d,vd->...v", h, self.weight(params, "embed").astype(h.dtype))


@dataclass(frozen=True)
class Plain(Transform):
    """The stored weights as they are; adapters in the tree are ignored."""


identity = Plain()


def check_transform(materialize) -> Transform:
    """`materialize` itself, or a TypeError saying what the hook must be."""
    if not isinstance(materialize, Transform):
        raise TypeError(f"materialize must be a Transform (alpaca_jax.model.transform), got "
                        f"{type(materialize).__name__}; wrap a weight function in a Transform "
                        "subclass that overrides weight(tree, name)")
    return materialize
