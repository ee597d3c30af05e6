"""`taylor` / `taylor+` (Shortened LLaMA): per block, the sum over its nine weights (q k v o
gate up down and both norms) of sum |W * G|, G the gradient of the mean cross-entropy summed
(with sign) over calibration batches. `taylor+` is the same score; the "+" is the paper's
protection (the first four and last two blocks are never removed), registered as its default.
Adapters are merged into the weights first: they are part of the weight they adapt."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.forward import forward, next_token_nll
from alpaca_jax.prune.registry import register_criterion
from alpaca_jax.prune.scores import BLOCK_WEIGHTS, batches, merged, per_layer_abs_sum


def _mean_ce(layers, params, tokens, cfg, materialize):
    logits, _ = forward({**params, "layers": layers}, tokens, cfg, materialize=materialize)
    return jnp.mean(next_token_nll(logits, tokens))


_ce_grad = jax.jit(jax.grad(_mean_ce), static_argnames=("cfg", "materialize"))


def taylor_scores(params, cfg, calib_ids, *, batch_size: int | None = None,
                  materialize=adapted) -> np.ndarray:
    """Per block: sum over its nine weights of sum |W * G|, G the mean-CE gradient summed over
    calibration batches (the authors' default batch is all 10 rows at once). `params` as given
    (no merge)."""
    layers = params["layers"]
    total = None
    for toks in batches(calib_ids, batch_size):
        g = _ce_grad(layers, params, toks, cfg=cfg, materialize=materialize)
        g = {k: g[k] for k in BLOCK_WEIGHTS}
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return np.sum([per_layer_abs_sum(layers[k] * total[k]) for k in BLOCK_WEIGHTS], axis=0)


def _score(params, cfg, ids, *, batch_size, seed, materialize) -> np.ndarray:
    return taylor_scores(merged(params), cfg, ids, batch_size=batch_size, materialize=materialize)


register_criterion("taylor", needs_calibration=True,
                   summary="sum |W * dL/dW| over the block's nine weights")(_score)
register_criterion("taylor+", aliases=("taylor_plus",), needs_calibration=True, keep_first=4,
                   keep_last=2, summary="taylor, the first 4 and last 2 blocks kept")(_score)
