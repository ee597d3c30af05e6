"""Attention through `jax.nn.dot_product_attention`: XLA's fused softmax(QK^T)V on CPU, cuDNN's
flash kernel on a GPU in bf16/fp16. One place turns our masks into its arguments.

Masks are described, not materialised, where the kernel can take the description: a pass
without a cache is `is_causal=True` (plus a `[B, T, T]` same-segment mask for packed rows); only
a pass over a KV cache (left padding, an offset query window) passes a `[B, T, S]` boolean mask.
A query row whose keys are all masked (a left pad) gets a finite uniform softmax in XLA's
implementation, as the dense version's -1e30 fill did, so padded rows never produce NaN.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from alpaca_jax.config import ATTENTION_IMPLS

_MASKED = -1e30  # the reference's fill: finite, so a fully masked row stays NaN-free


class Mask(NamedTuple):
    """`causal`: key s visible to query t iff s <= t (same T and S). `allowed`: a `[B, T, S]`
    boolean mask ANDed with it (segments, or a cache's window); None when causal says it all."""
    causal: bool
    allowed: jax.Array | None


def implementation(impl: str, dtype) -> str | None:
    """The `implementation=` argument: `auto` picks cuDNN on a GPU in a 16-bit compute dtype
    (its flash kernel takes no fp32) and XLA elsewhere."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r}; supported: {ATTENTION_IMPLS}")
    if impl == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and jax.default_backend() == "gpu" else "xla"
    return impl


def attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask: Mask, impl: str = "auto"):
    """`[B, T, H*K]`: grouped-query attention (query head h reads kv head h // (H // G), as HF
    and as `dot_product_attention` group heads)."""
    B, T, H, K = q_BxTxHxK.shape
    allowed = None if mask.allowed is None else mask.allowed[:, None, :, :]
    out = jax.nn.dot_product_attention(
        q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=allowed, is_causal=mask.causal,
        scale=K ** -0.5, implementation=implementation(impl, q_BxTxHxK.dtype))
    return out.reshape(B, T, H * K)


def reference_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask: Mask, impl: str = "auto"):
    """The dense einsum version this module replaced (fp32 scores, explicit mask), kept as the
    specification the parity tests compare against."""
    B, T, H, K = q_BxTxHxK.shape
    S, G = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
    allowed = jnp.ones((B, T, S), bool) if mask.allowed is None else mask.allowed
    if mask.causal:
        allowed = allowed & (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None]
    q = q_BxTxHxK.reshape(B, T, G, H // G, K)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK).astype(jnp.float32)
    scores = scores * (K ** -0.5)
    scores = jnp.where(allowed[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxK.dtype)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK)
    return out.reshape(B, T, H * K)
