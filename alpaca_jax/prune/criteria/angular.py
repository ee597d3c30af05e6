"""`angular` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):
remove the n consecutive blocks whose input and output are closest in angle.

For n blocks starting at block l (0 <= l <= L-n):

    d(l, n) = mean over calibration rows of arccos(cos(x_l, x_{l+n})) / pi

x_j the residual stream entering block j at the row's last token (x_L: the stream after the last
block, before the final norm). The plan removes blocks l*..l*+n-1 for the smallest d(l*, n)
(ties: the smallest l*), among the starts whose run touches no protected block. Why a run and not
the n lowest per-block scores: the paper's argument is that a contiguous stretch whose output
barely rotates its input can be skipped as a whole; the per-block d(l, 1) of the blocks in a
run do not add up to d(l, n). So this criterion has a `plan` hook and `per_block=False`.

The record: `scores[l]` = d(l, n) for every start l <= L-n (protected starts included, for
inspection), None for l > L-n; `order` = the removed run, first block first; `starts` = the
allowed starts by ascending distance. `block_scores(..., "angular")` returns d(l, 1), the angle
between each block's own input and output.

The last-token streams come from the stream BI reads (`scores._stream`), one pass per batch;
cosines are taken in float64 on the host and clipped to [-1, 1] before arccos (rounding can put
a cosine just outside, and arccos would return NaN).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.model.adapters import adapted
from alpaca_jax.parallel.cluster import to_host
from alpaca_jax.prune.calibration import check_calibration
from alpaca_jax.prune.registry import register_criterion
from alpaca_jax.prune.scores import _stream, batches


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _last_token_stream(params, tokens, *, cfg, materialize):
    hs, _ = _stream(params, tokens, jnp.ones(cfg.num_layers, bool), cfg=cfg,
                    materialize=materialize)
    return hs[:, :, -1].astype(jnp.float32)          # [L+1, B, D]


def last_token_streams(params, cfg, calib_ids, *, batch_size: int | None = None,
                       materialize=adapted) -> np.ndarray:
    """x_j for j = 0..L at each row's last token: `[L+1, N, D]` float64."""
    streams = [to_host(_last_token_stream(params, t, cfg=cfg, materialize=materialize))
               for t in batches(calib_ids, batch_size)]
    return np.concatenate(streams, axis=1).astype(np.float64)


def distances_from_streams(streams: np.ndarray, n: int) -> np.ndarray:
    """d(l, n) for l = 0..L-n from last-token streams `[L+1, N, D]`: `[L-n+1]`."""
    if n < 1 or n >= streams.shape[0]:
        raise ValueError(f"a run of n blocks needs 1 <= n <= {streams.shape[0] - 1}, got {n}")
    a, b = streams[:-n], streams[n:]
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return (np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi).mean(axis=1)


def angular_distances(params, cfg, calib_ids, n: int, *, batch_size: int | None = None,
                      materialize=adapted) -> np.ndarray:
    """d(l, n) for every start l = 0..L-n: `[L-n+1]`."""
    ids = check_calibration(calib_ids, cfg.vocab_size)
    return distances_from_streams(last_token_streams(params, cfg, ids, batch_size=batch_size,
                                                     materialize=materialize), n)


def _plan(params, cfg, ids, n, keep_first, keep_last, *, batch_size, seed, materialize) -> dict:
    L = cfg.num_layers
    if n == 0:
        return {"scores": [None] * L, "order": [], "pruned": [], "starts": []}
    d = angular_distances(params, cfg, ids, n, batch_size=batch_size, materialize=materialize)
    if np.isnan(d).any():
        raise ValueError(f"angular distances contain NaN (a zero residual stream?): {d}")
    starts = sorted(range(keep_first, L - n - keep_last + 1), key=lambda l: (d[l], l))
    run = list(range(starts[0], starts[0] + n))   # check_n_blocks guarantees a start exists
    return {"scores": [float(d[l]) if l <= L - n else None for l in range(L)], "order": run,
            "pruned": run, "starts": starts}


@register_criterion("angular", needs_calibration=True, plan=_plan, per_block=False,
                    summary="the n consecutive blocks whose last-token input and output are "
                            "closest in angle")
def angular_scores(params, cfg, ids, *, batch_size, seed, materialize) -> np.ndarray:
    return angular_distances(params, cfg, ids, 1, batch_size=batch_size, materialize=materialize)
