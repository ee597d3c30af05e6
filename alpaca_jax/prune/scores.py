"""Block-importance criteria for depth pruning. Every criterion returns one score per block;
lower means less important (removed first).

- `ppl` (Shortened LLaMA): the calibration perplexity, exp(total token NLL / tokens), of the
  model with that block removed.
- `taylor` / `taylor+`: sum over the block's nine weights (q k v o gate up down and both norms) of
  sum |W * G|, G the gradient of the mean cross-entropy summed (with sign) over calibration
  batches. `taylor+` is the same score; the "+" is the protection applied at selection.
- `magnitude`: sum of |W| over the same nine weights.
- `bi` (ShortGPT's block influence): 1 - cosine similarity of the block's input and output
  residual streams, averaged over every calibration token.
- `random`: seeded uniform scores, the baseline.

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
from alpaca_jax.model.forward import (block, causal_inputs, embed_tokens, forward, logits_of,
                                      next_token_nll)
from alpaca_jax.model.params import LAYER_KERNELS, LAYER_NORMS
from alpaca_jax.model.rope import inv_frequencies, rope_cos_sin
from alpaca_jax.prune.calibration import check_calibration

CRITERIA = ("ppl", "taylor", "taylor+", "magnitude", "bi", "random")
_ALIASES = {"taylor_plus": "taylor+"}
BLOCK_WEIGHTS = LAYER_KERNELS + LAYER_NORMS   # the nine weights of a block


def canonical_criterion(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {name!r}; known: {', '.join(CRITERIA)} "
                         f"(or taylor_plus)")
    return name


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


def _batches(ids, batch_size):
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
    batches = _batches(calib_ids, batch_size)
    n_tok = calib_ids.shape[0] * (calib_ids.shape[1] - 1)
    keep_j = jnp.asarray(keep)
    suffixes = {}   # block i skipped: the kept blocks after it start from its recorded input
    for i in candidates:
        after = [j for j in range(i + 1, L) if keep[j]]
        suffixes[i] = (jnp.asarray(after + [0] * (L - len(after)), jnp.int32),
                       jnp.int32(len(after)))
    base, totals = 0.0, {i: 0.0 for i in candidates}
    for toks in batches:
        hs, nll = _stream(params, toks, keep_j, cfg=cfg, materialize=materialize)
        base += float(nll)
        for i, (blocks, count) in suffixes.items():
            totals[i] += float(_suffix_nll(params, hs[i], toks, blocks, count, cfg=cfg,
                                           materialize=materialize))
    return float(np.exp(base / n_tok)), {i: float(np.exp(t / n_tok)) for i, t in totals.items()}


def _mean_ce(layers, params, tokens, cfg, materialize):
    logits, _ = forward({**params, "layers": layers}, tokens, cfg, materialize=materialize)
    return jnp.mean(next_token_nll(logits, tokens))


_ce_grad = jax.jit(jax.grad(_mean_ce), static_argnames=("cfg", "materialize"))


def taylor_scores(params, cfg, calib_ids, *, batch_size: int | None = None,
                  materialize=adapted) -> np.ndarray:
    """Per block: sum over its nine weights of sum |W * G|, G the mean-CE gradient summed over
    calibration batches (the authors' default batch is all 10 rows at once)."""
    layers = params["layers"]
    total = None
    for toks in _batches(calib_ids, batch_size):
        g = _ce_grad(layers, params, toks, cfg=cfg, materialize=materialize)
        g = {k: g[k] for k in BLOCK_WEIGHTS}
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return np.sum([_per_layer_abs_sum(layers[k] * total[k]) for k in BLOCK_WEIGHTS], axis=0)


def _per_layer_abs_sum(x) -> np.ndarray:
    return np.abs(np.asarray(x, np.float64)).reshape(x.shape[0], -1).sum(axis=1)


def magnitude_scores(params) -> np.ndarray:
    layers = params["layers"]
    return np.sum([_per_layer_abs_sum(layers[k]) for k in BLOCK_WEIGHTS], axis=0)


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _cosine_sums(params, tokens, *, cfg, materialize):
    hs, _ = _stream(params, tokens, jnp.ones(cfg.num_layers, bool), cfg=cfg,
                    materialize=materialize)
    a, b = hs[:-1].astype(jnp.float32), hs[1:].astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
    return jnp.sum(cos, axis=(1, 2))


def bi_scores(params, cfg, calib_ids, *, batch_size=None, materialize=adapted) -> np.ndarray:
    """ShortGPT's block influence over the residual stream (before the final norm)."""
    sums = sum(np.asarray(_cosine_sums(params, t, cfg=cfg, materialize=materialize), np.float64)
               for t in _batches(calib_ids, batch_size))
    return 1.0 - sums / calib_ids.size


def block_scores(params, cfg: ModelConfig, calib_ids=None, criterion: str = "ppl", *,
                 batch_size: int | None = None, seed: int = 0,
                 materialize=adapted) -> np.ndarray:
    """Scores `[L]` (lower = less important). `calib_ids`: int `[N, T]` (not needed for
    magnitude and random). PPL returns the calibration perplexity with each block removed."""
    criterion = canonical_criterion(criterion)
    L = cfg.num_layers
    if criterion == "random":
        return np.random.default_rng(seed).random(L)
    if criterion == "magnitude":
        return magnitude_scores(_merged(params))
    if calib_ids is None:
        raise ValueError(f"criterion {criterion!r} needs calibration ids [N, T]")
    ids = check_calibration(calib_ids, cfg.vocab_size)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if criterion == "ppl":
        _, scores = removal_ppl(params, cfg, ids, batch_size=batch_size, materialize=materialize)
        return np.array([scores[i] for i in range(L)])
    if criterion == "bi":
        return bi_scores(params, cfg, ids, batch_size=batch_size, materialize=materialize)
    return taylor_scores(_merged(params), cfg, ids, batch_size=batch_size,
                         materialize=materialize)


def _merged(params):
    from alpaca_jax.peft.lora import merge   # adapters count as part of the weight they adapt

    return merge(params)
