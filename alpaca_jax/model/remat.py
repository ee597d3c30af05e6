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

# The name `quant/formats/ops.py` gives a costly quantizer's codes and scales
# (`Format.costly_quantizer`); every policy here and QAT's own matmul remat keep it.
QUANT_CODES = "quant_codes"


def policy(name: str):
    """The `jax.checkpoint` policy for a REMAT_POLICIES name (None for `none`). Every policy
    also keeps values named `quant_codes` (a costly quantizer's codes, a byte per weight: the
    K-quants' host-side search, `quant/formats/ops.py`), so the backward does not search again."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {name!r}; supported: {REMAT_POLICIES}")
    cp = jax.checkpoint_policies
    if name == "none":
        return None
    if name == "block":
        base = cp.nothing_saveable
    elif name == "offload_dot_with_no_batch_dims":
        base = cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    else:
        base = getattr(cp, name)
    keep = cp.save_only_these_names(QUANT_CODES)

    def with_codes(prim, *args, **params):
        # not `save_from_both_policies`: the offload policy answers with an offload
        # instruction, not a boolean, which that helper refuses
        return True if keep(prim, *args, **params) else base(prim, *args, **params)
    return with_codes


def remat_block(body, name: str):
    """`body` under `jax.checkpoint` with the named policy (unchanged for `none`)."""
    if name == "none":
        return body
    return jax.checkpoint(body, policy=policy(name))
