"""The remat (activation checkpointing) policy of the block scan, by name.

Without remat the backward pass keeps every intermediate autodiff saves, for every block: at
7B that is several times the weights. `block` keeps only each block's input and recomputes the
rest during the backward (about one extra forward of compute); the `dots_*` policies keep the
matmul outputs and recompute the cheap elementwise work; `offload_dot_with_no_batch_dims`
keeps them in pinned host memory (a GPU feature; XLA:CPU has no separate host memory kind).
"""
from __future__ import annotations

import jax

from alpaca_jax.config import REMAT_POLICIES


def policy(name: str):
    """The `jax.checkpoint` policy for a REMAT_POLICIES name (None for `none`)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {name!r}; supported: {REMAT_POLICIES}")
    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "block":
        return cp.nothing_saveable
    if name == "offload_dot_with_no_batch_dims":
        return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    return getattr(cp, name)


def remat_block(body, name: str):
    """`body` under `jax.checkpoint` with the named policy (unchanged for `none`)."""
    if name == "none":
        return body
    return jax.checkpoint(body, policy=policy(name))
