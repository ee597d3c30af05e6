"""Perplexity: exp(total token NLL / number of scored tokens) — never a mean of per-window
perplexities.

Protocol (HF's sliding-window recipe): the token stream is cut into windows of `ctx_len`
tokens starting every `stride` tokens (default `ctx_len`: disjoint windows). A token is scored
at most once, by the first window that holds it after at least one token of context, so with
disjoint windows each window's first token is context only (n_tokens - n_windows are scored),
and with `stride < ctx_len` every token after the first is scored. With `bos=True` every window
is prefixed with BOS, which is context only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.forward import forward, next_token_nll


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _window_nll(params, tokens_BxT, score_BxT, *, cfg, materialize):
    logits, _ = forward(params, tokens_BxT, cfg, materialize=materialize)
    return jnp.sum(next_token_nll(logits, tokens_BxT) * score_BxT[:, 1:])


def _windows(n_tokens: int, ctx_len: int, stride: int):
    """(begin, end, first scored index) per window; no token is scored twice."""
    out, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        end = min(begin + ctx_len, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


def token_nll(params, cfg, ids, *, ctx_len: int = 512, stride: int | None = None,
              bos_id: int | None = None, batch_size: int = 8, materialize=adapted):
    """(sum of token NLLs, number of scored tokens) over a 1-D id stream."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    if ids.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.size}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got range "
                         f"[{ids.min()}, {ids.max()}]")
    stride = stride or ctx_len
    if not 0 < stride <= ctx_len:
        raise ValueError(f"stride must be in (0, ctx_len={ctx_len}], got {stride}")
    extra = 0 if bos_id is None else 1
    groups: dict[int, list] = {}
    for begin, end, first in _windows(ids.size, ctx_len - extra, stride):
        row = ids[begin:end]
        score = np.zeros(row.size, np.float32)
        score[first - begin:] = 1.0
        if extra:
            row, score = np.concatenate([[bos_id], row]), np.concatenate([[0.0], score])
        groups.setdefault(row.size, []).append((row, score))
    total, count = 0.0, 0
    for _, rows in sorted(groups.items()):
        for k in range(0, len(rows), batch_size):
            chunk = rows[k:k + batch_size]
            toks = np.stack([r for r, _ in chunk])
            score = np.stack([s for _, s in chunk])
            pad = batch_size - len(chunk)  # fixed batch shape: one compilation per length
            if pad and len(rows) > batch_size:
                toks = np.concatenate([toks, np.repeat(toks[:1], pad, 0)])
                score = np.concatenate([score, np.zeros((pad, score.shape[1]), np.float32)])
            total += float(_window_nll(params, jnp.asarray(toks), jnp.asarray(score), cfg=cfg,
                                       materialize=materialize))
            count += int(score.sum())
    return total, count


def perplexity(params, cfg, ids_or_text, tokenizer=None, *, ctx_len: int = 512,
               stride: int | None = None, bos: bool = False, max_tokens: int | None = None,
               batch_size: int = 8, materialize=adapted) -> float:
    """Perplexity of a token stream (1-D ids) or of text (tokenized without BOS; documents in a
    list are joined with a blank line). `max_tokens` keeps the first N tokens of the stream."""
    docs = [ids_or_text] if isinstance(ids_or_text, str) else ids_or_text
    if isinstance(docs, (list, tuple)) and docs and all(isinstance(d, str) for d in docs):
        if tokenizer is None:
            raise ValueError("perplexity of text needs a tokenizer")
        ids = tokenizer.encode("\n\n".join(docs), bos=False, parse_special=False)
    else:
        ids = np.asarray(ids_or_text).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos_id = None
    if bos:
        bos_id = getattr(tokenizer, "bos_id", None) if tokenizer is not None else cfg.bos_token_id
        if bos_id is None:
            raise ValueError("bos=True but neither the tokenizer nor the config has a BOS id")
    total, count = token_nll(params, cfg, ids, ctx_len=ctx_len, stride=stride, bos_id=bos_id,
                             batch_size=batch_size, materialize=materialize)
    return float(np.exp(total / count))


def perplexity_of_logits(logits_TxV, ids_T) -> float:
    """Perplexity of one sequence given its logits `[T, V]` from any runtime (numpy, float64
    accumulation): how outputs of llama.cpp or torch are put on the same scale as ours."""
    logits = np.asarray(logits_TxV, np.float64)
    ids = np.asarray(ids_T)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return float(np.exp(-logp[np.arange(ids.size - 1), ids[1:]].mean()))

