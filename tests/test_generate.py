"""KV cache and generation: cached prefill+decode equals the full forward."""
import numpy as np

from alpaca_jax import forward, generate_ids, make_cache
from alpaca_jax.model.generate import sample_logits
from hf_reference import tiny_hf_model, to_jax

import jax
import jax.numpy as jnp


def _setup(**kw):
    return to_jax(tiny_hf_model(**kw))


def test_prefill_then_decode_equals_full_forward():
    params, cfg = _setup()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 20))
    full, _ = forward(params, tokens, cfg)
    cache = make_cache(cfg, batch=2, max_len=32)
    pre, cache = forward(params, tokens[:, :12], cfg, cache=cache)
    steps = [pre]
    for t in range(12, 20):
        step, cache = forward(params, tokens[:, t:t + 1], cfg, cache=cache)
        steps.append(step)
    assert int(cache["end"]) == 20
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], 1),
                               np.asarray(full), rtol=0, atol=1e-5)


def test_left_padded_rows_equal_unpadded():
    params, cfg = _setup()
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, cfg.vocab_size, 5), rng.randint(0, cfg.vocab_size, 9)
    batch = np.zeros((2, 9), np.int32)
    batch[0, 4:], batch[1] = a, b
    cache = make_cache(cfg, batch=2, max_len=16, start=[4, 0])
    got, cache = forward(params, batch, cfg, cache=cache)
    ref_a, _ = forward(params, a[None], cfg)
    np.testing.assert_allclose(np.asarray(got)[0, 4:], np.asarray(ref_a)[0], atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()  # pad rows attend to nothing, still no NaN
    # one decode step for both rows after padding
    nxt = np.array([[3], [7]])
    step, _ = forward(params, nxt, cfg, cache=cache)
    ref_a2, _ = forward(params, np.concatenate([a, [3]])[None], cfg)
    np.testing.assert_allclose(np.asarray(step)[0, 0], np.asarray(ref_a2)[0, -1], atol=1e-5)


def _greedy_reference(params, cfg, prompt, n, eos):
    """The uncached loop: the whole sequence through the forward for each new token. The sequence
    sits at the start of one fixed 32-token buffer (causal attention: the zeros after it change
    nothing before them), so every step reuses one compiled forward."""
    seq = list(prompt)
    fwd = jax.jit(lambda p, t: forward(p, t, cfg)[0])
    for _ in range(n):
        buf = np.zeros((1, 32), np.int32)
        buf[0, :len(seq)] = seq
        logits = fwd(params, buf)
        nxt = int(np.asarray(logits)[0, len(seq) - 1].argmax())
        if nxt in eos:
            break
        seq.append(nxt)
    return seq[len(prompt):]


def test_greedy_generation_matches_uncached_loop_for_ragged_batch():
    params, cfg = _setup()
    rng = np.random.RandomState(2)
    prompts = [rng.randint(3, cfg.vocab_size, n).tolist() for n in (3, 11, 17)]
    got = generate_ids(params, cfg, prompts, max_new_tokens=8, eos_ids=())
    for p, g in zip(prompts, got):
        assert g == _greedy_reference(params, cfg, p, 8, ())


def test_generation_stops_at_eos():
    params, cfg = _setup()
    prompt = np.random.RandomState(3).randint(3, cfg.vocab_size, 6).tolist()
    free = generate_ids(params, cfg, [prompt], max_new_tokens=6, eos_ids=())[0]
    stop_tok = free[2]
    cut = generate_ids(params, cfg, [prompt], max_new_tokens=6, eos_ids=(stop_tok,))[0]
    assert cut == free[: free.index(stop_tok)]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    params, cfg = _setup()
    prompt = [[5, 6, 7, 8]]
    a = generate_ids(params, cfg, prompt, 10, temperature=1.0, seed=3, eos_ids=())
    b = generate_ids(params, cfg, prompt, 10, temperature=1.0, seed=3, eos_ids=())
    c = generate_ids(params, cfg, prompt, 10, temperature=1.0, seed=4, eos_ids=())
    assert a == b and a != c
    greedy = generate_ids(params, cfg, prompt, 10, eos_ids=())
    assert generate_ids(params, cfg, prompt, 10, temperature=0.7, top_k=1, eos_ids=()) == greedy


def test_top_p_keeps_only_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draws = np.array([int(sample_logits(logits, k, 1.0, 0, 0.7)[0]) for k in keys])
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are cut
