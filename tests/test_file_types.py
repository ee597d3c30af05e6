"""llama.cpp's K-quant file types (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K): our GGUF of each is
llama.cpp's own `llama_model_quantize` of our F32 export, tensor by tensor (type and bytes), on
two tiny models of shapes no test was written for: one whose rows tile 256-blocks (the per-layer
mixes show) and one whose rows do not (the fallbacks show); and the QAT forward of a mix is
its PTQ model."""
from __future__ import annotations

import ctypes

import gguf
import jax
import numpy as np
import pytest

from alpaca_jax import forward, load_gguf
from alpaca_jax.export import to_gguf
from alpaca_jax.model.params import LAYER_INDEX
from alpaca_jax.quant import FakeQuant, QuantSpec, ptq, resolve
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model

FILE_TYPES = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K"]


@pytest.fixture(scope="module", params=["rows256_untied", "rows96_tied"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    vocab = len(tiny_bpe_vocab()[0])
    if request.param == "rows256_untied":
        # 9 layers: use_more_bits picks 0, 3, 6, 7, 8; Q4_K_S's first n/8 ffn_down is layer 0
        hf = tiny_hf_model(seed=7, vocab=vocab, hidden=256, heads=4, kv_heads=2, inter=256,
                           layers=9, tie=False)
    else:
        hf = tiny_hf_model(seed=8, vocab=vocab, hidden=96, heads=4, kv_heads=2, inter=256,
                           layers=9, tie=True)
    write_tiny_gguf(hf, d / "src.gguf")
    params, cfg, tok = load_gguf(d / "src.gguf")
    f32 = to_gguf(params, cfg, tok, d / "ours-f32.gguf", "F32")
    return params, cfg, tok, f32, d


def _tensors(path):
    return {t.name: (t.tensor_type, np.asarray(t.data).tobytes())
            for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_our_file_is_llama_cpp_s_quantization_of_our_f32_export(model, ftype):
    import llama_cpp
    params, cfg, tok, f32, d = model
    ours = _tensors(to_gguf(params, cfg, tok, d / f"ours-{ftype}.gguf", ftype))
    dst = d / f"llama-{ftype}.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(),
                                          ctypes.byref(p)) == 0
    theirs = _tensors(dst)
    assert sorted(ours) == sorted(theirs)
    types = {n: t.name for n, (t, _) in theirs.items()}
    wrong_type = {n: (ours[n][0].name, t) for n, t in types.items() if ours[n][0].name != t}
    assert not wrong_type, wrong_type
    wrong_bytes = [n for n in theirs if ours[n][1] != theirs[n][1]]
    assert not wrong_bytes, wrong_bytes
    # the mix is really a mix where the rows allow it (the test would be weak otherwise)
    if cfg.hidden_size == 256 and ftype.endswith("_M"):
        down = {types[f"blk.{i}.ffn_down.weight"] for i in range(cfg.num_layers)}
        assert down == {"Q6_K", ftype[:2] + "_K"}, down
    if cfg.hidden_size == 96 and ftype != "Q6_K":
        assert types["blk.0.attn_q.weight"] in ("Q5_0", "Q5_1")


def test_the_plan_is_the_file_s(model):
    """`resolve` names each layer's format as the file above holds it."""
    params, cfg, tok, f32, d = model
    plan = resolve(QuantSpec("q4_k_m"), cfg)
    types = {n: t.name.lower() for n, (t, _) in _tensors(d / "ours-Q4_K_M.gguf").items()}
    for i in range(cfg.num_layers):
        want = plan["layers/wv"] if isinstance(plan["layers/wv"], str) else plan["layers/wv"][i]
        assert types[f"blk.{i}.attn_v.weight"] == want


def test_the_qat_forward_of_a_mix_is_its_ptq_model(model):
    """FakeQuant picks each layer's format inside the layer scan (a switch on the block index):
    the weights it sees there are the PTQ model's, quantized layer by layer outside it, bit for
    bit; so the logits agree to float rounding."""
    params, cfg, tok, f32, d = model
    spec = QuantSpec("q4_k_m")
    tr = FakeQuant.from_spec(spec, cfg)
    L = cfg.num_layers
    seen = jax.jit(lambda layers: jax.lax.map(
        lambda a: {k: tr.weight({**a[0], LAYER_INDEX: a[1]}, k) for k in ("wv", "w_down")},
        (layers, np.arange(L))))(params["layers"])
    shipped = ptq(params, spec, cfg)["layers"]
    for k in ("wv", "w_down"):
        assert np.array_equal(np.asarray(seen[k]).view(np.uint32),
                              np.asarray(shipped[k]).view(np.uint32)), k
    ids = np.arange(1, 17)[None] % cfg.vocab_size
    qat = np.asarray(forward(params, ids, cfg, materialize=tr)[0])
    ref = np.asarray(forward(ptq(params, spec, cfg), ids, cfg)[0])
    np.testing.assert_allclose(qat, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    grads = jax.grad(lambda p: forward(p, ids, cfg, materialize=FakeQuant.from_spec(
        spec, cfg))[0].sum())(params)
    assert np.isfinite(np.asarray(grads["layers"]["w_down"])).all()
    assert float(np.abs(np.asarray(grads["layers"]["w_down"])).sum()) > 0


def test_rounded_once_then_activations_only_is_the_emulating_model(model):
    """Export checks its files against `ptq` weights under `FakeQuant(weights=False)` (the
    activation rounding alone), so the K-quant search runs once, not at every decode step:
    every quantized matmul is `FakeQuant(activations=True)`'s on the float weights. (Whole
    forwards are not compared: an ulp between the two programs moves an 8-bit activation code
    now and then, and that grows through the blocks; benchmarks/parity_export.py measures it.)"""
    import dataclasses
    params, cfg, tok, f32, d = model
    spec = QuantSpec("q4_k_m", activations=True)
    fq = FakeQuant.from_spec(spec, cfg)
    once = dataclasses.replace(fq, weights=False)
    rounded = ptq(params, spec, cfg)
    x = np.random.default_rng(0).normal(size=(5, cfg.hidden_size)).astype(np.float32)
    xd = np.random.default_rng(1).normal(size=(5, cfg.intermediate_size)).astype(np.float32)
    for i in range(cfg.num_layers):
        lp = {**jax.tree.map(lambda a: a[i], params["layers"]), LAYER_INDEX: i}
        lr = {**jax.tree.map(lambda a: a[i], rounded["layers"]), LAYER_INDEX: i}
        for k, inp in (("wq", x), ("wv", x), ("w_down", xd)):
            a = np.asarray(fq.linear(inp, lp, k))
            b = np.asarray(once.linear(inp, lr, k))
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    plain = np.asarray(jax.tree.map(lambda a: a[0], rounded["layers"])["wq"])
    assert not np.allclose(x @ plain, np.asarray(once.linear(x, {**jax.tree.map(
        lambda a: a[0], rounded["layers"]), LAYER_INDEX: 0}, "wq")), atol=1e-6)  # rounds x


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_K_M"])
def test_every_matmul_reproduces_llama_cpp_on_its_input(model, qtype):
    """Per matmul, on llama.cpp's own inputs: the activation emulation of each weight type,
    including Q8_1's fp16-rounded block sums (Q4_1, Q5_1, and the Q5_K mixes' Q5_1 fallback)."""
    from llama_cpp_probe import matmul_errors

    params, cfg, tok, f32, d = model
    path = to_gguf(params, cfg, tok, d / f"probe-{qtype}.gguf", qtype)
    ids = [int(i) for i in np.arange(1, 38) % cfg.vocab_size]
    errors = matmul_errors(path, params, cfg, qtype, ids)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 2e-5, f"{qtype} {worst}: max |diff| / scale = {errors[worst]:.3g}"
