"""`bi` (ShortGPT's block influence, Men et al. 2024): 1 - cosine similarity of the block's
input and output residual streams (before the final norm), averaged over every calibration
token. Reads the stream that `scores._stream` records entering every block."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.parallel.cluster import to_host
from alpaca_jax.prune.registry import register_criterion
from alpaca_jax.prune.scores import _stream, batches


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _cosine_sums(params, tokens, *, cfg, materialize):
    hs, _ = _stream(params, tokens, jnp.ones(cfg.num_layers, bool), cfg=cfg,
                    materialize=materialize)
    a, b = hs[:-1].astype(jnp.float32), hs[1:].astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
    return jnp.sum(cos, axis=(1, 2))


@register_criterion("bi", needs_calibration=True,
                    summary="1 - cos(block input, block output), mean over tokens")
def bi_scores(params, cfg, ids, *, batch_size, seed, materialize) -> np.ndarray:
    sums = sum(to_host(_cosine_sums(params, t, cfg=cfg, materialize=materialize)).astype(np.float64)
               for t in batches(ids, batch_size))
    return 1.0 - sums / ids.size
