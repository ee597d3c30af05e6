"""Batched generation: left-padded prefill plus one compiled decode loop (`lax.while_loop`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.forward import forward, make_cache
from alpaca_jax.parallel.cluster import to_host

_PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, to bound recompilation


def sample_logits(logits_BxV, key, temperature: float, top_k: int, top_p: float):
    """Greedy when temperature == 0, else temperature / top-k / top-p (nucleus) sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        kept = jnp.where(before < top_p, sorted_desc, jnp.inf)
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_ids", "pad_id", "materialize"))
def _generate(params, tokens_BxP, start_B, key, *, cfg, max_new_tokens, temperature, top_k,
              top_p, eos_ids, pad_id, materialize):
    B, P = tokens_BxP.shape
    cache = make_cache(cfg, B, P + max_new_tokens, start=start_B)
    logits, cache = forward(params, tokens_BxP, cfg, cache=cache, materialize=materialize)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    key, sub = jax.random.split(key)
    tok = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tok, out, cache, done, key = state
        logits, cache = forward(params, tok[:, None], cfg, cache=cache, materialize=materialize)
        key, sub = jax.random.split(key)
        new = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
        new = jnp.where(done, pad_id, new)
        out = out.at[:, step].set(new)
        return step + 1, new, out, cache, done | jnp.isin(new, eos), key

    state = (jnp.int32(1), tok, out, cache, done, key)
    _, _, out, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out


def generate_ids(params, cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_ids=None, pad_id: int = 0, materialize=adapted) -> list[list[int]]:
    """New token ids per prompt, cut after the first end-of-sequence id (which is dropped)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each with at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_ids = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    longest = max(len(p) for p in prompts)
    P = -(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET
    if P + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    start = np.zeros((len(prompts),), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = p
        start[b] = P - len(p)
    out = _generate(params, jnp.asarray(tokens), jnp.asarray(start), jax.random.PRNGKey(seed),
                    cfg=cfg, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    top_k=int(top_k), top_p=float(top_p), eos_ids=eos_ids, pad_id=int(pad_id),
                    materialize=materialize)
    results = []
    for row in to_host(out).tolist():   # rows of every process (a gather when multi-process)
        cut = next((n for n, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:cut])
    return results


def generate(params, cfg: ModelConfig, tokenizer, prompts, max_new_tokens: int = 64, *,
             chat: bool = False, **kw) -> list[str]:
    """Generate text for each prompt. `chat=True` wraps each prompt as one user message in the
    tokenizer's chat template."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    ids = [tokenizer.encode(p) for p in prompts]
    kw.setdefault("pad_id", tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    return [tokenizer.decode(x) for x in generate_ids(params, cfg, ids, max_new_tokens, **kw)]
