"""Q5_0, Q5_1 and the K-quants (Q6_K, Q4_K, Q5_K) byte for byte against ggml's own quantizer
(`ggml_quantize_chunk` in llama-cpp-python's libggml-base: what llama-quantize runs per tensor),
and their fake quantization against the `gguf` package's dequantization of those bytes."""
from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ggml_reference import ggml_cpu_q8_k, ggml_quantize

from alpaca_jax.quant import fake_quant, quantize
from alpaca_jax.quant.formats import get_format, to_ggml_bytes

FORMATS = ["q5_0", "q5_1", "q6_k", "q4_k", "q5_k"]


def _cases():
    """`[in, out]` kernels (blocks along `in`, 512 = two super-blocks per column)."""
    rng = np.random.default_rng(0)
    mixed = rng.normal(0, 0.02, (512, 48)).astype(np.float32)
    mixed[:256, :6] = 0.0                  # all-zero super-blocks
    mixed[256:, 6:12] = 0.0
    mixed[:32, 12:18] = 0.0                # one zero sub-block among normal ones
    mixed[:, 18:24] *= 1e-20               # tiny: scales underflow fp16
    mixed[:, 24:30] = np.abs(mixed[:, 24:30])   # one-signed: the K-quant min is 0
    mixed[:, 30:36] = -np.abs(mixed[:, 30:36])
    mixed[:, 36:42] *= 1e4                 # large
    steps = np.tile(np.linspace(-1, 1, 64, dtype=np.float32), 8)[:, None] * np.ones((1, 8),
                                                                                    np.float32)
    return {"normal": rng.normal(0, 0.02, (512, 64)).astype(np.float32),
            "heavy_tailed": (rng.standard_t(2, (512, 64)) * 0.05).astype(np.float32),
            "zero_tiny_signed_large": mixed,
            "constant": np.full((512, 8), 0.37, np.float32),
            "negative_constant": np.full((512, 8), -0.37, np.float32),
            "evenly_spaced": steps}


CASES = _cases()


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_bytes_and_fake_quant_are_ggml_s(name, case):
    fmt = get_format(name)
    w = CASES[case]
    ref = ggml_quantize(w.T, fmt.ggml_type)                      # ggml rows: output channels
    ours = to_ggml_bytes(jax.jit(lambda w: quantize(w, name, axis=0))(w))
    assert ours.shape == ref.shape
    bad = np.nonzero(np.any(ours != ref, axis=1))[0]
    assert bad.size == 0, f"{bad.size} of {ref.shape[0]} rows differ, first {bad[:5]}"
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(ref, fmt.ggml_type).T
    got = np.asarray(jax.jit(lambda w: fake_quant(w, name))(w))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", ["q6_k", "q4_k", "q5_k"])
def test_many_heavy_tailed_super_blocks(name):
    """4,096 super-blocks of a heavy-tailed matrix: the scale searches compare float32 sums,
    so one sum rounded differently from ggml's would flip a sub-block somewhere."""
    w = (np.random.default_rng(3).standard_t(3, (1024, 1024)) * 0.03).astype(np.float32)
    fmt = get_format(name)
    ref = ggml_quantize(w.T, fmt.ggml_type)
    ours = to_ggml_bytes(quantize(w, name, axis=0))
    assert int(np.any(ours != ref, axis=1).sum()) == 0


@pytest.mark.parametrize("name", FORMATS)
def test_straight_through_gradient_and_vmap(name):
    """QAT trains through each format: the gradient of sum(fake_quant(w) * c) is c where the
    value is in range (everywhere for the K-quants), and a vmapped call is the stacked one."""
    w = (np.random.default_rng(4).standard_t(3, (3, 256, 16)) * 0.05).astype(np.float32)
    c = np.random.default_rng(5).normal(size=w.shape).astype(np.float32)
    g = jax.grad(lambda w: jnp.sum(jax.vmap(lambda x: fake_quant(x, name))(w) * c))(w)
    kept = np.asarray(g) == c
    assert kept.mean() > 0.97 and np.all((np.asarray(g) == 0) | kept)
    stacked = np.stack([np.asarray(fake_quant(w[i], name)) for i in range(3)])
    vmapped = np.asarray(jax.jit(jax.vmap(lambda x: fake_quant(x, name)))(w))
    assert np.array_equal(stacked, vmapped)


def test_q8_k_activations_are_ggml_s_q8_k_rows():
    """The activation rounding of K-quant matmuls is ggml's Q8_K: our dequantized values equal
    those of the `quantize_row_q8_K` llama.cpp's CPU backend runs (its x86 SIMD build)."""
    from alpaca_jax.quant import fake_quant_activations
    rng = np.random.default_rng(6)
    x = (rng.standard_t(3, (6, 512)) * 0.7).astype(np.float32)
    x[1, :256] = 0.0                                   # an all-zero block
    x[2, :] = np.round(x[2, :] * 4) / 4                # values on halfway points of the grid
    ref = ggml_cpu_q8_k(x)
    for name in ("q4_k", "q5_k", "q6_k"):
        got = np.asarray(jax.jit(lambda x: fake_quant_activations(x, name))(x))
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), name


@pytest.mark.parametrize("remat", ["none", "block", "dots_saveable"])
def test_qat_searches_once_per_weight_per_step_and_passes_the_gradient_straight(monkeypatch,
                                                                                 remat):
    """The K-quants' search runs on the host, so QAT's rematerialised matmul and the block remat
    policies keep its codes for the backward instead of searching again (it did: 45 searches a
    step here without block remat, 44 with it; now 23: 21 layer weights, the embedding and the
    head); the gradient is the straight-through one: the PTQ model's gradient at
    the rounded weights."""
    from alpaca_jax import forward, init_params
    from alpaca_jax.config import ModelConfig
    from alpaca_jax.quant import FakeQuant, QuantSpec, ptq, resolve
    from alpaca_jax.quant.formats import kquants

    calls = []
    for cls in (kquants._Q45K, kquants.Q6_K):
        monkeypatch.setattr(cls, "_host",
                            lambda self, x, f=cls._host: calls.append(1) or f(self, x))
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=64,
                      remat=remat)
    params = init_params(cfg, jax.random.PRNGKey(0))
    spec = QuantSpec("q4_k_m")
    plan = resolve(spec, cfg)
    ids = np.arange(1, 17)[None] % cfg.vocab_size
    def loss(p, **tr):
        return forward(p, ids, cfg, **tr)[0].astype(jnp.float32).std()
    qat = jax.jit(jax.grad(lambda p: loss(p, materialize=FakeQuant.from_spec(spec, cfg))))
    jax.block_until_ready(qat(params))                  # compile (and run) once
    calls.clear()
    g = qat(params)
    n_weights = sum(cfg.num_layers if k.startswith("layers/") else 1 for k in plan)
    assert len(calls) == n_weights == 23
    ref = jax.grad(loss)(ptq(params, spec, cfg))
    for k in ("wq", "wv", "w_down"):
        np.testing.assert_allclose(np.asarray(g["layers"][k]), np.asarray(ref["layers"][k]),
                                   rtol=0, atol=1e-4 * float(np.abs(ref["layers"][k]).max()))


def test_a_fixed_k_quant_model_is_rounded_once_for_evaluation(monkeypatch):
    """Evaluation (the pipeline's evaluate stage, the harness, validation in training) of a
    K-quant model rounds the weights once (`fixed`: adapters merged, each weight on its grid)
    and then runs no search per forward; the logits are the per-forward quantizer's. A model
    without a K-quant tensor is left as it is."""
    from alpaca_jax import forward, init_params
    from alpaca_jax.config import ModelConfig
    from alpaca_jax.peft import add_lora
    from alpaca_jax.quant import FakeQuant, QuantSpec
    from alpaca_jax.quant.formats import kquants
    from alpaca_jax.quant.qat import fixed

    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=64)
    params = add_lora(init_params(cfg, jax.random.PRNGKey(0)), cfg, jax.random.PRNGKey(1),
                      rank=4, alpha=8.0)
    params["layers"]["lora"] = jax.tree.map(lambda x: x + 0.01, params["layers"]["lora"])
    tr = FakeQuant.from_spec(QuantSpec("q4_k_m"), cfg)
    ids = np.arange(1, 17)[None] % cfg.vocab_size
    ref = np.asarray(forward(params, ids, cfg, materialize=tr)[0])
    p, tr2 = fixed(params, tr)
    assert tr2.weights is False and "lora" not in p["layers"]
    calls = []
    for cls in (kquants._Q45K, kquants.Q6_K):
        monkeypatch.setattr(cls, "_host",
                            lambda self, x, f=cls._host: calls.append(1) or f(self, x))
    got = np.asarray(forward(p, ids, cfg, materialize=tr2)[0])
    assert calls == []
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    q8 = FakeQuant.from_spec(QuantSpec("q8_0"), cfg)       # no K-quant, not even the head
    p8, t8 = fixed(params, q8)
    assert p8 is params and t8 is q8


def test_a_chunked_loss_quantizes_a_k_quant_head_once(monkeypatch):
    """`train.loss_chunk` applies the head chunk by chunk; a QAT head (Q6_K here) is formed once
    before the chunks, so a step searches as often as the whole-sequence loss does, and the
    loss and gradient are the same."""
    from alpaca_jax import init_params
    from alpaca_jax.config import ModelConfig
    from alpaca_jax.quant import FakeQuant, QuantSpec
    from alpaca_jax.quant.formats import kquants
    from alpaca_jax.train.step import loss_sums

    calls = []
    for cls in (kquants._Q45K, kquants.Q6_K):
        monkeypatch.setattr(cls, "_host",
                            lambda self, x, f=cls._host: calls.append(1) or f(self, x))
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tr = FakeQuant.from_spec(QuantSpec("q4_k_m"), cfg)
    T = 17
    batch = {"tokens": np.arange(1, T + 1)[None] % cfg.vocab_size,
             "loss_mask": np.ones((1, T), np.float32), "positions": np.arange(T)[None]}
    out = {}
    for chunk in (0, 4):
        f = jax.jit(jax.value_and_grad(lambda p: loss_sums(p, batch, cfg, tr, chunk=chunk)[0]))
        jax.block_until_ready(f(params))
        calls.clear()
        out[chunk] = f(params)
        out[chunk, "calls"] = len(calls)
    assert out[0, "calls"] == out[4, "calls"] == 2 * 7 + 2
    np.testing.assert_allclose(float(out[4][0]), float(out[0][0]), rtol=1e-5)
    g0, g4 = out[0][1]["lm_head"], out[4][1]["lm_head"]
    np.testing.assert_allclose(np.asarray(g4), np.asarray(g0), rtol=0,
                               atol=1e-5 * float(np.abs(np.asarray(g0)).max()))
