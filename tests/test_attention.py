"""Attention through `jax.nn.dot_product_attention` against the dense einsum it replaced
(`reference_attention`): logits within 1e-5 (fp32) for causal, packed-segment, left-padded
cached and grouped-query passes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpaca_jax.model.forward as fwd
from alpaca_jax import forward
from alpaca_jax.config import ModelConfig
from alpaca_jax.model.attention import Mask, attention, implementation, reference_attention
from alpaca_jax.model.forward import make_cache
from alpaca_jax.model.params import init_params

REL = 1e-5


def _model(heads=4, kv_heads=2, seed=0):
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=heads, num_kv_heads=kv_heads)
    params = init_params(cfg, jax.random.PRNGKey(seed), std=0.3)   # logits of order 1-10
    return params, cfg


def _close(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    bound = REL * max(1.0, float(np.abs(ref).max()))
    assert np.isfinite(got).all()
    assert float(np.abs(got - ref).max()) <= bound


def _both(monkeypatch, run):
    """`run()` with the fused attention, then with the reference patched in."""
    got = run()
    with monkeypatch.context() as m:
        m.setattr(fwd, "attention", reference_attention)
        ref = run()
    return got, ref


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_causal_logits_match_the_dense_reference(monkeypatch, heads, kv_heads):
    params, cfg = _model(heads, kv_heads)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))
    got, ref = _both(monkeypatch, lambda: forward(params, tokens, cfg)[0])
    assert np.abs(np.asarray(ref)).max() > 1.0
    _close(got, ref)


def test_packed_segments_match_the_dense_reference(monkeypatch):
    params, cfg = _model()
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, cfg.vocab_size, (2, 20))
    seg = np.array([[0] * 7 + [1] * 9 + [2] * 4, [5] * 20])
    pos = np.array([list(range(7)) + list(range(9)) + list(range(4)), list(range(20))])
    got, ref = _both(monkeypatch, lambda: forward(params, tokens, cfg, positions=pos,
                                                  segment_ids=seg)[0])
    _close(got, ref)


def test_left_padded_cached_decode_matches_the_dense_reference(monkeypatch):
    """Prefill of left-padded rows into a cache, then two single-token decode steps: the mask
    is a `[B, T, S]` window with fully masked (pad) query rows, which must stay finite."""
    params, cfg = _model(4, 2)
    rng = np.random.RandomState(2)
    B, T, S = 2, 10, 16
    start = np.array([3, 0])
    tokens = rng.randint(0, cfg.vocab_size, (B, T))

    def run():
        cache = make_cache(cfg, B, S, start=start)
        out, cache = forward(params, tokens, cfg, cache=cache)
        steps = [out]
        for t in range(2):
            nxt = rng_tokens[t]
            out, cache = forward(params, nxt, cfg, cache=cache)
            steps.append(out)
        return [np.asarray(s) for s in steps]

    rng_tokens = [rng.randint(0, cfg.vocab_size, (B, 1)) for _ in range(2)]
    got, ref = _both(monkeypatch, run)
    for g, r in zip(got, ref):
        _close(g, r)
    # the unpadded row equals a pass without a cache over the same tokens
    plain, _ = forward(params, np.concatenate([tokens[1:]] + [t[1:] for t in rng_tokens], 1),
                       cfg)
    _close(np.concatenate([got[0][1], got[1][1], got[2][1]]), np.asarray(plain)[0])


def test_fully_masked_rows_are_finite_and_bf16_runs():
    rng = np.random.RandomState(3)
    q = jnp.asarray(rng.randn(1, 4, 4, 8), jnp.bfloat16)
    k = jnp.asarray(rng.randn(1, 6, 2, 8), jnp.bfloat16)
    allowed = np.ones((1, 4, 6), bool)
    allowed[0, 0] = False                           # a left pad: sees nothing
    out = attention(q, k, k, Mask(False, jnp.asarray(allowed)), "xla")
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 4, 32)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    ref = reference_attention(q, k, k, Mask(False, jnp.asarray(allowed)))
    np.testing.assert_allclose(np.asarray(out[0, 1:], np.float32),
                               np.asarray(ref[0, 1:], np.float32), atol=0.05)


def test_implementation_choice_and_bad_name():
    assert implementation("auto", jnp.float32) == "xla"   # and on CPU in any dtype
    assert implementation("auto", jnp.bfloat16) == ("cudnn" if jax.default_backend() == "gpu"
                                                     else "xla")
    with pytest.raises(ValueError, match="attention implementation 'flash'"):
        implementation("flash", jnp.float32)
    with pytest.raises(ValueError, match="ModelConfig.attention='flash'"):
        _model()[1].replace(attention="flash")
