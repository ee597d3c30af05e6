"""Quantizers against the `gguf` package (bit for bit), llama.cpp's tensor-type choices, the
straight-through estimator, PTQ/QAT consistency and bad input."""
from __future__ import annotations

import ctypes

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from alpaca_jax import forward, init_params
from alpaca_jax.config import ModelConfig
from alpaca_jax.peft import add_lora, merge
from alpaca_jax.quant import (FakeQuant, QuantSpec, fake_quant, fake_quant_activations, ptq,
                              quantize, quantize_params, resolve)
from alpaca_jax.quant.formats import to_ggml_bytes

GGML = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}


def _cases():
    rng = np.random.default_rng(0)
    ties = np.zeros((64, 96), np.float32)
    # each column (a row for ggml) holds amax 127 (d = 1, 1/d = 1) and values k + 0.5: exact
    # halfway points, where round-half-even and round-half-away differ
    ties[:] = (np.arange(64)[:, None] % 60 - 30 + 0.5)
    ties[0] = 127.0
    ties4 = np.tile(np.array([-8.0, -7.5, -6.5, 0.5, 1.5, 2.5, 7.5, 3.0] * 4, np.float32)[:, None],
                    (2, 40))  # Q4_0: d = 1, values at half steps; Q4_1 ties land elsewhere
    mixed = rng.normal(0, 0.02, (128, 64)).astype(np.float32)
    mixed[:32, :8] = 0.0                # all-zero blocks
    mixed[32:64, 8:16] *= 1e-30         # tiny (d underflows fp16)
    mixed[64:96, 16:24] *= 1e9          # huge (d overflows fp16 to inf)
    return {
        "normal": rng.normal(0, 0.02, (256, 96)).astype(np.float32),
        "heavy_tailed": (rng.standard_t(2, (256, 96)) * 0.05).astype(np.float32),
        "ties_q8": ties, "ties_q4": ties4, "zero_tiny_huge": mixed,
        "constant": np.full((64, 32), 0.37, np.float32),
    }


CASES = _cases()


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("fmt", list(GGML))
@pytest.mark.parametrize("case", list(CASES))
def test_fake_quant_is_bit_exact_with_gguf(fmt, case):
    w = CASES[case]
    with np.errstate(all="ignore"):
        ref_bytes = gguf.quants.quantize(w.T, GGML[fmt])
        ref = gguf.quants.dequantize(ref_bytes, GGML[fmt]).T
    got = jax.jit(lambda w: fake_quant(w, fmt))(w)
    assert _same_bits(got, ref), f"{np.sum(np.asarray(got) != ref)} values differ"
    # the codes and scales are ggml's bytes, so export writes exactly what training saw
    assert np.array_equal(to_ggml_bytes(quantize(w, fmt, axis=0)), ref_bytes)


def test_halfway_points_round_away_from_zero():
    w = np.zeros((32, 1), np.float32)
    w[0], w[1:4, 0] = 127.0, [2.5, -2.5, 0.5]
    got = np.asarray(fake_quant(w, "q8_0"))[:4, 0]
    np.testing.assert_array_equal(got, [127.0, 3.0, -3.0, 1.0])  # jnp.round would give 2, -2, 0


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "int8_channel", "int4_g32"])
def test_straight_through_gradient(fmt):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (64, 16)).astype(np.float32)
    g = rng.normal(0, 1, w.shape).astype(np.float32)
    grad = np.asarray(jax.grad(lambda w: jnp.sum(fake_quant(w, fmt) * g))(w))
    if fmt != "q4_0":
        np.testing.assert_array_equal(grad, g)  # no value is clipped by these formats
        return
    # Q4_0: the side opposite the largest magnitude can exceed code 15 and is clipped
    blocks = w.T.reshape(16, 2, 32)
    mx = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    d = mx / -8
    inside = ((blocks >= np.minimum(-8.5 * d, 7.5 * d)) & (blocks <= np.maximum(-8.5 * d, 7.5 * d)))
    inside = inside.reshape(16, 64).T
    assert not inside.all()  # the test data does clip somewhere
    np.testing.assert_array_equal(grad, np.where(inside, g, 0.0))


def test_generic_formats():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (64, 8)).astype(np.float32)
    for fmt, qmax, group in [("int8_channel", 127, 64), ("int4_channel", 7, 64),
                             ("int4_g32", 7, 32), ("int8_g16", 127, 16)]:
        q = quantize(w, fmt, axis=0)
        assert np.abs(np.asarray(q.codes)).max() == qmax
        deq = np.asarray(fake_quant(w, fmt))
        blocks = w.T.reshape(8, -1, group)
        s = np.abs(blocks).max(-1, keepdims=True) / qmax
        assert np.abs(deq.T.reshape(8, -1, group) - blocks).max() <= s.max() / 2 + 1e-7


def test_activation_fake_quant_is_on_the_8bit_grid_with_identity_gradient():
    x = np.random.default_rng(3).normal(0, 1, (2, 5, 64)).astype(np.float32)
    y = np.asarray(fake_quant_activations(x)).reshape(2, 5, 2, 32)
    d = (np.abs(x.reshape(2, 5, 2, 32)).max(-1, keepdims=True) / 127).astype(np.float16)
    codes = y / d.astype(np.float32)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    g = np.asarray(jax.grad(lambda x: jnp.sum(fake_quant_activations(x) * 2.0))(x))
    np.testing.assert_array_equal(g, 2.0)


CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64)


def test_llama_cpp_tensor_types(tmp_path):
    """`resolve`'s default policy is what llama.cpp's own quantizer does (tied and untied)."""
    import llama_cpp
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
    from hf_reference import tiny_hf_model

    names = {"embed": "token_embd.weight", "lm_head": "output.weight",
             "layers/wq": "blk.0.attn_q.weight", "layers/w_down": "blk.0.ffn_down.weight",
             "layers/wv": "blk.0.attn_v.weight"}
    vocab = len(tiny_bpe_vocab()[0])
    # hidden 256: rows of whole K-quant super-blocks, so llama.cpp gives Q4_x heads Q6_K
    for tie, hidden in ((True, 64), (False, 64), (True, 256), (False, 256)):
        src = tmp_path / f"f32_{tie}_{hidden}.gguf"
        write_tiny_gguf(tiny_hf_model(vocab=vocab, hidden=hidden, inter=128, tie=tie), src)
        cfg = CFG.replace(tie_embeddings=tie, vocab_size=vocab, hidden_size=hidden,
                          head_dim=hidden // CFG.num_heads)
        for fmt in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
            dst = tmp_path / f"{fmt}_{tie}_{hidden}.gguf"
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt.upper()}")
            assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                                  ctypes.byref(p)) == 0
            theirs = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(dst).tensors}
            ours = resolve(QuantSpec(fmt), cfg)
            for key, tensor in names.items():
                if tensor in theirs:
                    assert ours.get(key, "f32") == theirs[tensor], (tie, fmt, key)
            assert theirs["blk.0.attn_norm.weight"] == "f32"
            head = theirs.get("output.weight", theirs["token_embd.weight"])
            assert head == ("q6_k" if hidden == 256 and fmt != "q8_0" else "q8_0"), (tie, fmt)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qat_over_lora_then_merge_then_quantize_is_the_qat_forward(method):
    params = init_params(CFG, jax.random.PRNGKey(0))
    p = add_lora(params, CFG, jax.random.PRNGKey(1), rank=4, alpha=8, method=method)
    for ad in p["layers"]["lora"].values():
        ad["b"] = 0.05 * jax.random.normal(jax.random.PRNGKey(2), ad["b"].shape)
    tr = FakeQuant.from_spec(QuantSpec("q4_0"), CFG)
    # the weights the QAT forward uses, layer by layer inside the scan
    seen = jax.jit(lambda layers: jax.lax.map(
        lambda lp: {k: tr.weight(lp, k) for k in ("wq", "w_down")}, layers))(p["layers"])
    shipped = quantize_params(merge(p), QuantSpec("q4_0"), CFG)
    for k in ("wq", "w_down"):
        from alpaca_jax.quant import dequantize_blocks
        deq = np.asarray(dequantize_blocks(shipped[f"layers/{k}"]))  # [L, out, nb, 32]
        deq = deq.reshape(deq.shape[0], deq.shape[1], -1).transpose(0, 2, 1)
        assert _same_bits(seen[k], deq), k
    # and the QAT forward equals the PTQ model of the merged weights
    tokens = np.arange(10)[None] % CFG.vocab_size
    a = np.asarray(forward(p, tokens, CFG, materialize=tr)[0])
    b = np.asarray(forward(ptq(p, QuantSpec("q4_0"), CFG), tokens, CFG)[0])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_qat_step_trains_through_the_quantizer():
    from alpaca_jax.data.batching import pack
    from alpaca_jax.train.split import split, train_all
    from alpaca_jax.train.step import make_train_step
    import optax

    params = init_params(CFG, jax.random.PRNGKey(0))
    tr = FakeQuant.from_spec(QuantSpec("q8_0", activations=True), CFG)
    t, f = split(params, train_all)
    rows = pack([np.arange(3, 23)] * 2, [np.ones(20, np.float32)] * 2, 24, 0).rows(np.arange(2))
    batch = {k: v[None] for k, v in rows.items()}
    opt = optax.adam(1e-2)
    step = make_train_step(CFG, opt, tr)
    t2, _, m = step(jax.tree_util.tree_map(jnp.array, t), f, opt.init(t), batch, 0)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert not np.array_equal(np.asarray(t2["layers"]["wq"]), np.asarray(params["layers"]["wq"]))


def test_default_policy_and_bad_input():
    assert resolve(QuantSpec("q8_0"), CFG)["embed"] == "q8_0"
    tied = resolve(QuantSpec("q4_0"), CFG.replace(tie_embeddings=True))
    assert tied["embed"] == "q8_0" and tied["layers/wq"] == "q4_0" and "lm_head" not in tied
    untied = resolve(QuantSpec("q4_0"), CFG)
    assert untied["embed"] == "q4_0" and untied["lm_head"] == "q8_0"
    assert "embed" not in resolve(QuantSpec("q8_0", embed="none"), CFG)
    assert "embed" not in resolve(QuantSpec("int4_g32"), CFG)
    with pytest.raises(ValueError, match="unknown quant format 'q3_x'"):
        fake_quant(np.zeros((32, 4), np.float32), "q3_x")
    with pytest.raises(ValueError, match="unknown quant format 'q3_k'"):
        resolve(QuantSpec("q3_k"), CFG)
    with pytest.raises(ValueError, match="contracted dimension 48 is not a multiple"):
        fake_quant(np.zeros((48, 4), np.float32), "q8_0")
    odd = CFG.replace(hidden_size=48, head_dim=12)
    with pytest.raises(ValueError, match="cannot quantize layers/wq to q8_0: its contracted "
                                         "dimension 48"):
        resolve(QuantSpec("q8_0"), odd)
