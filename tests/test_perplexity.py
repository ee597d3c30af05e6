"""The perplexity protocol: no token scored twice, exp(total NLL / scored tokens)."""
import numpy as np
import pytest

from alpaca_jax import forward
from alpaca_jax.eval.perplexity import _windows, perplexity, token_nll
from hf_reference import tiny_hf_model, to_jax


def _direct_nll(params, cfg, window, first_scored):
    logits = np.asarray(forward(params, np.array([window]), cfg)[0][0], np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    idx = np.arange(first_scored, len(window))
    return -logp[idx - 1, np.asarray(window)[idx]].sum(), idx.size


@pytest.mark.parametrize("n,ctx,stride", [(50, 16, 16), (50, 16, 5), (13, 64, None), (40, 8, 8)])
def test_windows_score_each_token_at_most_once(n, ctx, stride):
    scored, starts = [], []
    for begin, end, first in _windows(n, ctx, stride or ctx):
        assert end - begin <= ctx and begin < first
        scored.extend(range(first, end))
        starts.append(begin)
    if stride is None or stride == ctx:  # disjoint: each window's first token is context only
        assert scored == [t for t in range(n) if t not in starts]
    else:  # sliding: every token after the first is scored, once
        assert scored == list(range(1, n))


def test_matches_direct_computation_with_sliding_windows():
    params, cfg = to_jax(tiny_hf_model())
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, 45)
    total, count = 0.0, 0
    for begin, end, first in _windows(45, 16, 6):
        t, c = _direct_nll(params, cfg, ids[begin:end], first - begin)
        total, count = total + t, count + c
    got_total, got_count = token_nll(params, cfg, ids, ctx_len=16, stride=6, batch_size=3)
    assert got_count == count == 44
    np.testing.assert_allclose(got_total, total, rtol=1e-5)
    ppl = perplexity(params, cfg, ids, ctx_len=16, stride=6)
    np.testing.assert_allclose(ppl, np.exp(total / count), rtol=1e-5)


def test_bos_is_context_only():
    params, cfg = to_jax(tiny_hf_model())
    ids = np.random.RandomState(1).randint(3, cfg.vocab_size, 20)
    t, c = token_nll(params, cfg, ids, ctx_len=32, bos_id=1)
    ref_t, ref_c = _direct_nll(params, cfg, np.concatenate([[1], ids]), 2)
    assert c == ref_c == 19
    np.testing.assert_allclose(t, ref_t, rtol=1e-5)


def test_bad_ids_are_rejected():
    params, cfg = to_jax(tiny_hf_model(vocab=97))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        token_nll(params, cfg, [1, 2, 97])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_nll(params, cfg, [5])
    with pytest.raises(ValueError, match="stride"):
        token_nll(params, cfg, [1, 2, 3], ctx_len=4, stride=8)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(params, cfg, "some text")
