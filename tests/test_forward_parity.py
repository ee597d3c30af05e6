"""Logit parity with transformers.LlamaForCausalLM on tiny random models built in-process."""
import jax
import numpy as np
import pytest

from alpaca_jax import forward
from hf_reference import hf_logits, tiny_hf_model, to_jax

# Asserted bound: |jax - torch| <= 1e-5 * max(1, max|logit|) elementwise, fp32 on CPU.
REL = 1e-5

VARIANTS = {
    "mha_untied": dict(heads=4, kv_heads=4),
    "gqa_untied": dict(heads=4, kv_heads=2),
    "gqa_tied": dict(heads=4, kv_heads=1, tie=True),
    "theta_500k": dict(rope_theta=500000.0),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
}


def assert_close_logits(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    bound = REL * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= bound, f"max |diff| {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_transformers(name):
    model = tiny_hf_model(**VARIANTS[name])
    params, cfg = to_jax(model)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 48))
    logits, cache = forward(params, tokens, cfg)
    assert cache is None
    assert np.abs(hf_logits(model, tokens)).max() > 1.0  # the scale the bound is relative to
    assert_close_logits(logits, hf_logits(model, tokens))


def test_jit_and_nojit_agree():
    params, cfg = to_jax(tiny_hf_model())
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 16))
    eager, _ = forward(params, tokens, cfg)
    jitted, _ = jax.jit(forward, static_argnames="cfg")(params, tokens, cfg=cfg)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=0, atol=1e-5)


def test_bf16_compute_close_to_fp32():
    params, cfg = to_jax(tiny_hf_model())
    tokens = np.random.RandomState(2).randint(0, cfg.vocab_size, (1, 32))
    ref, _ = forward(params, tokens, cfg)
    low, _ = forward(params, tokens, cfg.replace(compute_dtype="bfloat16"))
    ref, low = np.asarray(ref), np.asarray(low)
    assert low.dtype == np.float32  # logits always come back fp32
    assert np.abs(ref - low).max() < 0.05 * np.abs(ref).max()
    assert (ref.argmax(-1) == low.argmax(-1)).mean() > 0.9


# block remat, and offloading: the policy that could fail on a CPU (the others are JAX's names)
@pytest.mark.parametrize("policy", ["block", "offload_dot_with_no_batch_dims"])
def test_remat_does_not_change_values_or_grads(policy):
    params, cfg = to_jax(tiny_hf_model())
    tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 16))

    def loss(p, c):
        return forward(p, tokens, c)[0].mean()

    g0 = jax.grad(loss)(params, cfg)
    g1 = jax.grad(loss)(params, cfg.replace(remat=policy))
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_causality_by_gradients():
    """Logits at position t must not depend on tokens after t. Each position holds a distinct
    token, so the gradient w.r.t. embedding row tokens[j] is the gradient w.r.t. position j."""
    params, cfg = to_jax(tiny_hf_model(vocab=97))
    T = 12
    tokens = np.random.RandomState(4).permutation(cfg.vocab_size)[:T][None]
    for t in (0, 5, T - 1):
        grad = jax.grad(lambda p: forward(p, tokens, cfg)[0][0, t].sum())(params)["embed"]
        per_pos = np.abs(np.asarray(grad)[tokens[0]]).sum(-1)
        assert np.all(per_pos[t + 1:] == 0.0), (t, per_pos)
        assert np.all(per_pos[: t + 1] > 0.0), (t, per_pos)


def test_layer_mask_skips_blocks():
    params, cfg = to_jax(tiny_hf_model(layers=3))
    tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (1, 10))
    full, _ = forward(params, tokens, cfg)
    all_on, _ = forward(params, tokens, cfg, layer_mask=np.ones(3, bool))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(all_on))
    # dropping block 1 by mask equals a 2-layer model without it
    masked, _ = forward(params, tokens, cfg, layer_mask=np.array([True, False, True]))
    kept = dict(params, layers={k: v[np.array([0, 2])] for k, v in params["layers"].items()})
    small, _ = forward(kept, tokens, cfg.replace(num_layers=2))
    np.testing.assert_allclose(np.asarray(masked), np.asarray(small), rtol=0, atol=1e-5)


def test_segment_ids_isolate_packed_sequences():
    params, cfg = to_jax(tiny_hf_model())
    rng = np.random.RandomState(6)
    a, b = rng.randint(0, cfg.vocab_size, 7), rng.randint(0, cfg.vocab_size, 9)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[0] * 7 + [1] * 9])
    pos = np.array([list(range(7)) + list(range(9))])
    got, _ = forward(params, packed, cfg, positions=pos, segment_ids=seg)
    ref_a, _ = forward(params, a[None], cfg)
    ref_b, _ = forward(params, b[None], cfg)
    np.testing.assert_allclose(np.asarray(got)[0, :7], np.asarray(ref_a)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got)[0, 7:], np.asarray(ref_b)[0], atol=1e-5)
