"""Rotary position embeddings in the HF `rotate_half` layout (first half / second half pairs).

Frequencies are computed as `transformers` does (float32 powers), so logits match to ~1e-6.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """`[head_dim // 2]` float32 inverse frequencies, with the config's RoPE scaling applied."""
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return (inv_freq / np.float32(s.factor)).astype(np.float32)
    # llama3: low frequencies divided by `factor`, high kept, a smooth ramp between.
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_BxT: jnp.ndarray, inv_freq: np.ndarray):
    """cos, sin of shape `[B, T, head_dim]` (float32), halves repeated as HF does."""
    freqs = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxHxK: jnp.ndarray, cos_BxTxK: jnp.ndarray, sin_BxTxK: jnp.ndarray):
    half = x_BxTxHxK.shape[-1] // 2
    x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxTxK[:, :, None, :], sin_BxTxK[:, :, None, :]
    out = x_BxTxHxK.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_BxTxHxK.dtype)
