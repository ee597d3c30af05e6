"""Block scores for depth pruning: the machinery criteria share, and `block_scores`, which
asks the registry (`prune/registry.py`) for the criterion and calls its score. Every criterion
returns one score per block; lower means less important (removed first). The criteria
themselves, one module each, are in `prune/criteria/` (ppl, taylor and taylor+, magnitude, bi,
random, angular).

Shared here, because several criteria and the iterative procedure use them: the residual stream
entering every block (`_stream`: BI and angular read it), the removal perplexities
(`removal_ppl`: the ppl criterion, one-shot and iterative, and `benchmarks/bench_prune.py`), the
nine weights of a block and per-block |x| sums (taylor, magnitude), adapters merged into their
weights before weight-based scores.

Fast PPL scoring: the model with block i removed computes exactly the full model's residual
stream up to block i. One pass records the stream entering every block; candidate i then runs
only blocks i+1.. from the recorded input of block i. All candidates go through one compiled
function (the list of blocks to run and its length are traced arguments of a while loop), so
there is one compilation and L(L-1)/2 block evaluations instead of L(L-1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.forward import (block, causal_inputs, embed_tokens, logits_of,
                                      next_token_nll)
from alpaca_jax.model.params import LAYER_KERNELS, LAYER_NORMS
from alpaca_jax.model.rope import inv_frequencies, rope_cos_sin
from alpaca_jax.prune.calibration import check_calibration
from alpaca_jax.prune.registry import (canonical_criterion, criterion_names,  # noqa: F401 (API)
                                       get_criterion)

BLOCK_WEIGHTS = LAYER_KERNELS + LAYER_NORMS   # the nine weights of a block


def __getattr__(attr):   # CRITERIA: the registered names, read when asked (PEP 562)
    if attr == "CRITERIA":
        return criterion_names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _block_fn(tokens, cfg, materialize):
    B, T = tokens.shape
    positions, mask = causal_inputs(B, T)
    cos, sin = rope_cos_sin(positions, inv_frequencies(cfg))
    return lambda h, lp: block(h, lp, cos, sin, None, None, mask, cfg, materialize)[0]


def _nll_sum(params, h, tokens, cfg, materialize):
    return jnp.sum(next_token_nll(logits_of(params, h, cfg, materialize), tokens))


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _stream(params, tokens, keep, *, cfg, materialize):
    """The residual stream entering every block and leaving the last `[L+1, B, T, D]`, and the
    NLL sum of the model with `keep`'s blocks."""
    run_block = _block_fn(tokens, cfg, materialize)
    h0 = embed_tokens(params, tokens, cfg, materialize)
    L = cfg.num_layers

    def body(j, carry):   # a fori_loop, not a scan: XLA:GPU autotunes a scan's body for ~45 s
        h, hs = carry
        hs = jax.lax.dynamic_update_index_in_dim(hs, h, j, 0)
        return jnp.where(keep[j], run_block(h, _layer(params, j)), h), hs

    h, hs = jax.lax.fori_loop(0, L, body, (h0, jnp.zeros((L + 1,) + h0.shape, h0.dtype)))
    return (jax.lax.dynamic_update_index_in_dim(hs, h, L, 0),
            _nll_sum(params, h, tokens, cfg, materialize))


def _layer(params, j):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, 0, False), params["layers"])


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _suffix_nll(params, h, tokens, blocks, count, *, cfg, materialize):
    """NLL sum of the model entered with stream h that then runs blocks[:count] in order. The
    trip count is a traced value (a while loop), so every candidate shares one compilation and
    runs only its own blocks."""
    run_block = _block_fn(tokens, cfg, materialize)

    def body(k, h):
        return run_block(h, _layer(params, blocks[k]))

    h = jax.lax.fori_loop(0, count, body, h)
    return _nll_sum(params, h, tokens, cfg, materialize)


def batches(ids, batch_size):
    """Calibration rows in consecutive chunks of `batch_size` (None or 0: all at once)."""
    step = ids.shape[0] if not batch_size else batch_size
    return [jnp.asarray(ids[k:k + step]) for k in range(0, ids.shape[0], step)]


def removal_ppl(params, cfg: ModelConfig, calib_ids, keep=None, candidates=None, *,
                batch_size: int | None = None, materialize=adapted):
    """(perplexity of the model with `keep`'s blocks, {i: perplexity with block i also removed}
    for each candidate i). Perplexity is exp(total NLL / number of predicted tokens) over all
    calibration rows."""
    L = cfg.num_layers
    keep = np.ones(L, bool) if keep is None else np.asarray(keep, bool)
    candidates = [i for i in range(L) if keep[i]] if candidates is None else list(candidates)
    chunks = batches(calib_ids, batch_size)
    n_tok = calib_ids.shape[0] * (calib_ids.shape[1] - 1)
    keep_j = jnp.asarray(keep)
    suffixes = {}   # block i skipped: the kept blocks after it start from its recorded input
    for i in candidates:
        after = [j for j in range(i + 1, L) if keep[j]]
        suffixes[i] = (jnp.asarray(after + [0] * (L - len(after)), jnp.int32),
                       jnp.int32(len(after)))
    base, totals = 0.0, {i: 0.0 for i in candidates}
    for toks in chunks:
        hs, nll = _stream(params, toks, keep_j, cfg=cfg, materialize=materialize)
        base += float(nll)
        for i, (blocks, count) in suffixes.items():
            totals[i] += float(_suffix_nll(params, hs[i], toks, blocks, count, cfg=cfg,
                                           materialize=materialize))
    return float(np.exp(base / n_tok)), {i: float(np.exp(t / n_tok)) for i, t in totals.items()}


def per_layer_abs_sum(x) -> np.ndarray:
    """sum |x| over everything but the leading layer axis, in float64: `[L]`."""
    from alpaca_jax.parallel.cluster import to_host
    return np.abs(to_host(x).astype(np.float64)).reshape(x.shape[0], -1).sum(axis=1)


def merged(params):
    """Adapters merged into the weights they adapt: they count as part of the weight."""
    from alpaca_jax.peft.lora import merge

    return merge(params)


def calibration_for(criterion, cfg: ModelConfig, calib_ids, batch_size: int | None = None):
    """The checked calibration ids `criterion` (a name or `Criterion`) scores on: None when it
    needs none, else `[N, T]` int32 ids (a clear error when they are missing or wrong)."""
    c = get_criterion(criterion) if isinstance(criterion, str) else criterion
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not c.needs_calibration:
        return None
    if calib_ids is None:
        raise ValueError(f"criterion {c.name!r} needs calibration ids [N, T]")
    return check_calibration(calib_ids, cfg.vocab_size)


def block_scores(params, cfg: ModelConfig, calib_ids=None, criterion: str = "ppl", *,
                 batch_size: int | None = None, seed: int = 0,
                 materialize=adapted) -> np.ndarray:
    """Scores `[L]` (lower = less important) of the registered `criterion`. `calib_ids`: int
    `[N, T]` (not needed for magnitude and random). PPL returns the calibration perplexity with
    each block removed; angular the distance d(l, 1) of each block's input and output (its
    n-block choice needs `prune_plan`)."""
    c = get_criterion(criterion)
    ids = calibration_for(c, cfg, calib_ids, batch_size)
    return np.asarray(c.score(params, cfg, ids, batch_size=batch_size, seed=seed,
                              materialize=materialize), np.float64)
