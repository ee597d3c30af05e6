"""Zero-shot accuracy on llm-foundry's in-context-learning JSONL formats.

- multiple choice `{"query", "choices", "gold"}`: each choice is a continuation of the query;
- schema `{"context_options", "continuation", "gold"}`: the one continuation under each context;
- language modelling `{"context", "continuation"}`: correct when greedy decoding reproduces the
  continuation exactly.

Scoring follows lm-evaluation-harness: a continuation's score is the sum of its tokens'
log-probabilities given the context (context and continuation tokenized separately, the
continuation preceded by one space unless the context ends in whitespace); `acc` picks the
highest sum, `acc_norm` (multiple choice only) the highest sum per UTF-8 byte of the
continuation. Sequences longer than `max_len` keep their last `max_len` tokens.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.forward import forward

FORMATS = {"multiple_choice": ("query", "choices", "gold"),
           "schema": ("context_options", "continuation", "gold"),
           "language_modeling": ("context", "continuation")}
_BUCKET = 32


def _detect(rec: dict, where: str) -> str:
    for fmt, keys in FORMATS.items():
        if all(k in rec for k in keys):
            return fmt
    raise ValueError(f"{where}: keys {sorted(rec)} match none of the zero-shot formats "
                     + "; ".join(f"{f} {list(k)}" for f, k in FORMATS.items()))


def _check(rec: dict, fmt: str, where: str) -> None:
    def fail(msg):
        raise ValueError(f"{where}: {msg}")

    if fmt == "language_modeling":
        if not (isinstance(rec["context"], str) and isinstance(rec["continuation"], str)
                and rec["continuation"].strip()):
            fail("context and continuation must be strings, the continuation non-empty")
        return
    options = rec["choices"] if fmt == "multiple_choice" else rec["context_options"]
    key = "choices" if fmt == "multiple_choice" else "context_options"
    if not (isinstance(options, list) and len(options) >= 2
            and all(isinstance(o, str) for o in options)):
        fail(f"{key} must be a list of at least 2 strings")
    gold = rec["gold"]
    if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(options)):
        fail(f"gold={gold!r} is not an index into the {len(options)} {key}")
    text = rec["query"] if fmt == "multiple_choice" else rec["continuation"]
    if not isinstance(text, str):
        fail("query/continuation must be a string")
    if fmt == "multiple_choice" and not all(o.strip() for o in options):
        fail("a choice is empty")


def read_tasks(path, limit: int | None = None) -> tuple[str, list[dict]]:
    """(format, records) of a JSONL file, every record checked; the first `limit` records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such zero-shot file")
    fmt, records = None, []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object")
            this = _detect(rec, where)
            if fmt is not None and this != fmt:
                raise ValueError(f"{where}: a {this} record in a {fmt} file")
            fmt = this
            _check(rec, fmt, where)
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    return fmt, records


def _join(context: str, continuation: str) -> str:
    return continuation if not context or context[-1].isspace() else " " + continuation


def _requests(fmt: str, rec: dict) -> list[tuple[str, str]]:
    """(context, continuation) per option (one for language modelling)."""
    if fmt == "multiple_choice":
        return [(rec["query"], _join(rec["query"], c)) for c in rec["choices"]]
    if fmt == "schema":
        return [(c, _join(c, rec["continuation"])) for c in rec["context_options"]]
    return [(rec["context"], _join(rec["context"], rec["continuation"]))]


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _token_scores(params, tokens_BxT, *, cfg, materialize):
    """log p(token t+1 | <= t) and whether it is the argmax, `[B, T-1]` each."""
    logits, _ = forward(params, tokens_BxT, cfg, materialize=materialize)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target = tokens_BxT[:, 1:]
    lp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return lp, jnp.argmax(logits[:, :-1], axis=-1) == target


@functools.partial(jax.jit, static_argnames=("cfg", "materialize"))
def _last_logprobs(params, tokens_BxT, last_B, *, cfg, materialize):
    """log p(. | tokens <= last) over the vocabulary, `[B, V]`."""
    logits, _ = forward(params, tokens_BxT, cfg, materialize=materialize)
    return jax.nn.log_softmax(jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0])


def _batches(seqs, order, batch_size, pad):
    """Right-padded `[batch_size, T]` token batches (T a multiple of 32, one compilation per
    length) over `order`; padding rows and columns are never read (causal attention)."""
    for k in range(0, len(order), batch_size):
        b = order[k:k + batch_size]
        T = -(-max(len(seqs[i]) for i in b) // _BUCKET) * _BUCKET
        toks = np.full((batch_size, T), pad, np.int32)
        for r, i in enumerate(b):
            toks[r, : len(seqs[i])] = seqs[i]
        yield b, toks


def score_continuations(params, cfg, tokenizer, pairs, *, max_len: int | None = None,
                        batch_size: int = 8, materialize=adapted, progress: bool = False):
    """(sum of log-probs, all tokens greedy) of each continuation given its context. One-token
    continuations of the same context (yes/no answers) share one pass over that context."""
    max_len = max_len or cfg.max_position_embeddings
    seqs = []
    for ctx, cont in pairs:
        c = tokenizer.encode(ctx) if ctx else []
        k = tokenizer.encode(cont, bos=False, parse_special=False)
        if not k:
            raise ValueError(f"continuation {cont!r} encodes to no tokens")
        if not c:          # the first continuation token needs something to be predicted from
            bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
            c = [bos]
        ids = (c + k)[-max_len:]
        if len(k) >= len(ids):
            raise ValueError(f"continuation of {len(k)} tokens does not fit max_len={max_len}")
        seqs.append((ids, len(k)))
    sums, greedy = np.zeros(len(seqs)), np.zeros(len(seqs), bool)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    single: dict[tuple, list[int]] = {}       # context ids -> requests with one-token answers
    multi = []
    for i, (ids, k) in enumerate(seqs):
        if k == 1:
            single.setdefault(tuple(ids[:-1]), []).append(i)
        else:
            multi.append(i)
    contexts = list(single)
    n_batches = -(-len(multi) // batch_size) + -(-len(contexts) // batch_size)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_batches, desc="zero-shot", unit="batch", leave=False)
    order = sorted(multi, key=lambda i: len(seqs[i][0]))
    for b, toks in _batches([s for s, _ in seqs], order, batch_size, pad):
        lp, g = (np.asarray(x) for x in _token_scores(params, jnp.asarray(toks), cfg=cfg,
                                                      materialize=materialize))
        for r, i in enumerate(b):
            n, k = len(seqs[i][0]), seqs[i][1]
            sl = slice(n - 1 - k, n - 1)        # predictions of the continuation's tokens
            sums[i], greedy[i] = lp[r, sl].sum(), g[r, sl].all()
        if bar is not None:
            bar.update()
    order = sorted(range(len(contexts)), key=lambda j: len(contexts[j]))
    for b, toks in _batches([list(c) for c in contexts], order, batch_size, pad):
        last = np.zeros(batch_size, np.int32)
        last[: len(b)] = [len(contexts[j]) - 1 for j in b]
        logp = np.asarray(_last_logprobs(params, jnp.asarray(toks), jnp.asarray(last), cfg=cfg,
                                         materialize=materialize))
        for r, j in enumerate(b):
            for i in single[contexts[j]]:
                t = seqs[i][0][-1]
                sums[i], greedy[i] = logp[r, t], logp[r].argmax() == t
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return sums, greedy


def zeroshot(params, cfg, tokenizer, jsonl_path, limit: int | None = None, *,
             batch_size: int = 8, max_len: int | None = None, materialize=adapted,
             progress: bool = False) -> dict:
    """Accuracy on one llm-foundry JSONL file: `{"format", "n", "acc", "acc_stderr"}`, plus
    `acc_norm` for multiple choice. `limit` takes the first N records."""
    fmt, records = read_tasks(jsonl_path, limit)
    pairs, owner = [], []
    for j, rec in enumerate(records):
        for pair in _requests(fmt, rec):
            pairs.append(pair)
            owner.append(j)
    sums, greedy = score_continuations(params, cfg, tokenizer, pairs, max_len=max_len,
                                       batch_size=batch_size, materialize=materialize,
                                       progress=progress)
    owner = np.asarray(owner)
    out = {"format": fmt, "n": len(records)}
    if fmt == "language_modeling":
        correct = greedy
    else:
        nbytes = np.array([len(c.encode("utf-8")) for _, c in pairs], np.float64)
        correct, correct_norm = [], []
        for j, rec in enumerate(records):
            idx = np.flatnonzero(owner == j)
            correct.append(int(np.argmax(sums[idx])) == rec["gold"])
            correct_norm.append(int(np.argmax(sums[idx] / nbytes[idx])) == rec["gold"])
        if fmt == "multiple_choice":
            out["acc_norm"] = float(np.mean(correct_norm))
        correct = np.asarray(correct)
    acc = float(np.mean(correct))
    out["acc"] = acc
    out["acc_stderr"] = math.sqrt(acc * (1 - acc) / (len(records) - 1)) if len(records) > 1 else 0.0
    return out
