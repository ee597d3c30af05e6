"""The one forward pass: training, scoring, prefill and decode all go through `forward`.

Blocks run under one `lax.scan` over the stacked `layers` params. Every matmul with a weight
goes through the `materialize` hook, a `Transform` (`model/transform.py`) whose
`linear(x, tree, name, rng=...)` may skip forming the weight (LoRA's factored path). That is how
LoRA, QAT and other transforms compose without touching this file. The default, `adapted`
(`model/adapters.py`), applies any adapters the params hold, so they are never silently ignored.
A dropout key reaches the transform only as the `rng` argument: per block, then per kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.attention import Mask, attention
from alpaca_jax.model.params import LAYER_INDEX, LAYER_KERNELS
from alpaca_jax.model.remat import remat_block
from alpaca_jax.model.rope import apply_rope, inv_frequencies, rope_cos_sin
from alpaca_jax.model.transform import Transform, check_transform, identity  # noqa: F401
from alpaca_jax.parallel.logical import constrain_batch

Materialize = Transform


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y).astype(x.dtype)


def linear(x: jax.Array, tree: dict, name: str, materialize: Materialize,
           rng=None) -> jax.Array:
    """x @ W_eff: the single place a block's weight meets an activation. `rng` is the block's
    key; each kernel gets its own (the kernel's index folded in)."""
    if rng is not None:
        rng = jax.random.fold_in(rng, LAYER_KERNELS.index(name))
    return materialize.linear(x, tree, name, rng=rng)


def block(h, lp, cos, sin, kv_BxSxGxK, write_at, mask: Mask, cfg, materialize, rng=None):
    """One pre-norm decoder block. With a cache, the new k/v are written at `write_at` first.
    `rng`: this block's PRNG key for stochastic transforms, or None (deterministic)."""
    B, T, _ = h.shape
    h = constrain_batch(h)    # the residual stream stays split by rows under a mesh
    x = rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    q = linear(x, lp, "wq", materialize, rng).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = linear(x, lp, "wk", materialize, rng).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = linear(x, lp, "wv", materialize, rng).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_BxSxGxK is None:
        k_all, v_all = k, v
    else:
        k_cache, v_cache = kv_BxSxGxK
        k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, write_at, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, write_at, 0, 0))
    attn = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, cfg.attention)
    h = h + linear(attn, lp, "wo", materialize, rng)
    x = rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    gate = linear(x, lp, "w_gate", materialize, rng)
    up = linear(x, lp, "w_up", materialize, rng)
    h = h + linear(jax.nn.silu(gate) * up, lp, "w_down", materialize, rng)
    return h, k_all, v_all


def causal_inputs(B: int, T: int, positions=None, segment_ids=None):
    """RoPE positions `[B, T]` and the causal (optionally per-segment) `Mask` of a pass without
    a cache; plain causal attention materialises no mask at all."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    allowed = None
    if segment_ids is not None:
        allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
    return positions, Mask(causal=True, allowed=allowed)


def embed_tokens(params, tokens_BxT, cfg: ModelConfig,
                 materialize: Materialize = adapted) -> jax.Array:
    """The residual stream entering block 0: embedding rows in the compute dtype. Under a mesh
    the rows split over data x fsdp (`parallel/logical.py`), so every stage's forward, and the
    block scorers that start here, are data parallel."""
    tokens_BxT = constrain_batch(tokens_BxT)
    embed = materialize.weight(params, "embed")
    return jnp.take(embed, tokens_BxT, axis=0).astype(cfg.compute_dtype)


def next_token_nll(logits_BxTxV, tokens_BxT) -> jax.Array:
    """`[B, T-1]`: -log p(token t+1 | tokens <= t) from logits of a pass over `tokens`."""
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]


def logits_of(params, h, cfg: ModelConfig, materialize: Materialize = adapted) -> jax.Array:
    """Final norm and LM head on the residual stream `h` `[B, T, D]`: float32 logits."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if cfg.tie_embeddings:
        logits = materialize.tied_head(h, params)
    else:
        logits = materialize.linear(h, params, "lm_head")
    return constrain_batch(logits.astype(jnp.float32))


def forward(params: dict, tokens_BxT: jax.Array, cfg: ModelConfig, *, positions=None,
            cache: dict | None = None, layer_mask=None, materialize: Materialize = adapted,
            segment_ids=None, rng=None):
    """Logits `[B, T, V]` (float32) and the updated cache (None when called without one).

    positions: `[B, T]` RoPE positions; default `0..T-1`, or, with a cache, the slot index
        minus the row's left padding (`cache['start']`).
    cache: from `make_cache`; the T new tokens are written at slot `cache['end']`, attention
        sees slots `[start_b, end + t]`.
    layer_mask: `[L]` bool; False skips a block (its output is its input) with no change of
        shapes, so every "remove block i" candidate reuses one compiled function.
    segment_ids: `[B, T]` ints (no cache only); tokens attend only within their own segment,
        for packed sequences.
    materialize: the `Transform` every weight goes through (default: `adapted`).
    rng: a PRNG key for stochastic transforms (adapter dropout in training), passed down as an
        argument: block i gets `fold_in(rng, i)`, its kernel j `fold_in(that, j)`. None
        (evaluation, generation) is deterministic.
    """
    check_transform(materialize)
    B, T = tokens_BxT.shape
    L = cfg.num_layers
    h = embed_tokens(params, tokens_BxT, cfg, materialize)

    t_idx = jnp.arange(T)
    if cache is None:
        positions, mask = causal_inputs(B, T, positions, segment_ids)
        write_at = None
    else:
        if segment_ids is not None:
            raise ValueError("segment_ids is not supported together with a KV cache")
        end, start = cache["end"], cache["start"]
        S = cache["k"].shape[2]
        q_slot = end + t_idx
        if positions is None:
            positions = jnp.maximum(q_slot[None, :] - start[:, None], 0)
        s_idx = jnp.arange(S)
        mask = Mask(causal=False, allowed=(s_idx[None, None, :] <= q_slot[None, :, None]) & (
            s_idx[None, None, :] >= start[:, None, None]))
        write_at = end
    cos, sin = rope_cos_sin(positions, inv_frequencies(cfg))

    keep = jnp.ones((L,), bool) if layer_mask is None else jnp.asarray(layer_mask, bool)

    def body(carry, xs):
        h, kc, vc = carry
        lp, keep_i, i = xs
        key = None if rng is None else jax.random.fold_in(rng, i)
        kv = None if kc is None else (kc[i], vc[i])
        lp = {**lp, LAYER_INDEX: i}
        h_new, k_all, v_all = block(h, lp, cos, sin, kv, write_at, mask, cfg, materialize, key)
        h = jnp.where(keep_i, h_new, h)
        if kc is not None:
            kc = jax.lax.dynamic_update_index_in_dim(kc, k_all, i, 0)
            vc = jax.lax.dynamic_update_index_in_dim(vc, v_all, i, 0)
        return (h, kc, vc), None

    body = remat_block(body, cfg.remat)
    kc, vc = (None, None) if cache is None else (cache["k"], cache["v"])
    (h, kc, vc), _ = jax.lax.scan(body, (h, kc, vc), (params["layers"], keep, jnp.arange(L)))

    logits = logits_of(params, h, cfg, materialize)
    new_cache = None
    if cache is not None:
        new_cache = {"k": kc, "v": vc, "end": cache["end"] + T, "start": cache["start"]}
    return logits, new_cache


def make_cache(cfg: ModelConfig, batch: int, max_len: int, start=None, dtype=None) -> dict:
    """An empty KV cache: `k`, `v` `[L, B, max_len, Hkv, Dh]`, `end` (next slot, shared by
    the batch) and `start` `[B]` (left-padding per row; slots before it are never attended)."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "end": jnp.zeros((), jnp.int32), "start": start}
