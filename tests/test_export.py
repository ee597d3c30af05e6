"""GGUF export against the references: llama.cpp runs the file (logits, tokenizer), the `gguf`
package's quantizers and reader check the bytes."""
import gguf
import jax
import numpy as np
import pytest

from alpaca_jax import forward, load_gguf
from alpaca_jax.export import to_gguf
from alpaca_jax.export.runtime import open_llama
from alpaca_jax.io.gguf_in import permute_rope
from alpaca_jax.peft import add_lora
from alpaca_jax.prune import drop_layers
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model
from test_forward_parity import assert_close_logits

F32_TYPE = 0   # GGML_TYPE_F32, for an unrounded KV cache


@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    model = tiny_hf_model(seed=5, vocab=len(tiny_bpe_vocab()[0]), layers=3, hidden=64, heads=4,
                          kv_heads=2, inter=96, tie=request.param == "tied", max_pos=256)
    write_tiny_gguf(model, path)
    return load_gguf(path)


def _llama(path, n_ctx=64):
    # ggml's standard kernels: the runtime repacking some CPUs get (x86 AVX2, ARM) has its own
    # rounding, checked on its own below
    return open_llama(path, repack=False, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                      n_threads=2, type_k=F32_TYPE, type_v=F32_TYPE)


def test_f32_file_runs_in_llama_cpp_with_the_jax_logits(tiny, tmp_path):
    params, cfg, tok = tiny
    out = to_gguf(params, cfg, tok, tmp_path / "m.gguf", qtype="F32")
    ids = list(np.random.default_rng(0).integers(3, cfg.vocab_size, 20))
    ref = np.asarray(forward(params, np.array([ids]), cfg)[0][0])
    llm = _llama(out)
    llm.eval(ids[:12])                       # a prompt in one pass ...
    for t in ids[12:]:                       # ... then one-token decode steps through the cache
        llm.eval([t])
    assert_close_logits(np.asarray(llm.scores[:20], np.float32), ref)
    text = "Hello there, the hell of it: 42 tokens!"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
        tok.encode(text, bos=False, parse_special=False)


def test_pruned_model_with_adapters_is_merged_and_renumbered(tiny, tmp_path):
    params, cfg, tok = tiny
    p = add_lora(params, cfg, jax.random.PRNGKey(0), rank=2, alpha=4.0, targets="all")
    p["layers"]["lora"] = jax.tree.map(lambda x: x + 0.03, p["layers"]["lora"])
    p, c = drop_layers(p, cfg, [1])
    out = to_gguf(p, c, tok, tmp_path / "pruned.gguf", qtype="F32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()
              if k == "llama.block_count"}
    assert fields["llama.block_count"] == 2
    ids = list(np.random.default_rng(1).integers(3, c.vocab_size, 16))
    llm = _llama(out)
    llm.eval(ids)
    assert_close_logits(np.asarray(llm.scores[:16], np.float32),
                  np.asarray(forward(p, np.array([ids]), c)[0][0]))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_bytes_equal_the_gguf_quantizer(tiny, tmp_path, qtype):
    """Every quantized tensor equals `gguf.quants.quantize` of the float weight in llama.cpp's
    layout (q/k permuted) byte for byte, and the file loads in llama.cpp."""
    params, cfg, tok = tiny
    out = to_gguf(params, cfg, tok, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    lay = params["layers"]
    checked = 0
    for i in range(cfg.num_layers):
        for ours, name, heads in (("wq", "attn_q", cfg.num_heads), ("wk", "attn_k",
                                  cfg.num_kv_heads), ("wv", "attn_v", None),
                                  ("w_down", "ffn_down", None)):
            w = np.asarray(lay[ours][i], np.float32).T
            if heads:
                w = permute_rope(w, heads)
            t = tensors[f"blk.{i}.{name}.weight"]
            assert t.tensor_type.name == qtype
            ref = gguf.quants.quantize(np.ascontiguousarray(w), gguf.GGMLQuantizationType[qtype])
            np.testing.assert_array_equal(np.asarray(t.data).reshape(ref.shape), ref)
            checked += 1
        assert tensors[f"blk.{i}.attn_norm.weight"].tensor_type.name == "F32"
    assert checked == 4 * cfg.num_layers
    head = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
    assert tensors[head].tensor_type.name == "Q8_0"   # llama.cpp keeps the head at 8 bits
    _llama(out).eval([5, 6, 7])


def _kl(p_logits, q_logits):
    p = p_logits - np.logaddexp.reduce(p_logits, -1, keepdims=True)
    q = q_logits - np.logaddexp.reduce(q_logits, -1, keepdims=True)
    return (np.exp(p) * (p - q)).sum(-1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_logits_equal_fake_quant_with_llama_cpp_activation_rounding(tiny, tmp_path,
                                                                               qtype):
    """llama.cpp's CPU path rounds every matmul input to 8-bit blocks of 32 before the dot
    product with Q8_0/Q4_0 weights. The JAX fake-quant model with that activation rounding
    emulated (`activations=True`) gives llama.cpp's logits to float rounding; with weights alone
    fake-quantized the gap is the activation rounding itself, a small but nonzero KL."""
    from alpaca_jax.quant import FakeQuant, QuantSpec

    params, cfg, tok = tiny
    out = to_gguf(params, cfg, tok, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
    ids = list(np.random.default_rng(2).integers(3, cfg.vocab_size, 24))
    llm = _llama(out)
    llm.eval(ids[:16])
    for t in ids[16:]:
        llm.eval([t])
    ref = np.asarray(llm.scores[:24], np.float64)
    emulated = FakeQuant.from_spec(QuantSpec(qtype.lower(), activations=True), cfg)
    got = np.asarray(forward(params, np.array([ids]), cfg, materialize=emulated)[0][0])
    assert_close_logits(got, ref)
    weights_only = FakeQuant.from_spec(QuantSpec(qtype.lower()), cfg)
    kl = _kl(ref, np.asarray(forward(params, np.array([ids]), cfg,
                                     materialize=weights_only)[0][0], np.float64))
    assert 1e-6 < kl.mean() < 1e-2, kl.mean()


def test_bad_input_is_refused_and_leaves_no_file(tiny, tmp_path):
    params, cfg, tok = tiny
    with pytest.raises(ValueError, match="qtype 'Q3_K' is not supported"):
        to_gguf(params, cfg, tok, tmp_path / "a.gguf", qtype="Q3_K")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        to_gguf(params, cfg, None, tmp_path / "b.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_gguf(params, cfg, tok, tmp_path / "no" / "c.gguf")
    odd = cfg.replace(hidden_size=48, intermediate_size=80)   # not multiples of 32
    with pytest.raises(ValueError, match="qtype Q4_0 cannot be applied"):
        to_gguf({}, odd, tok, tmp_path / "d.gguf", qtype="Q4_0")

    class Boom(Exception):
        pass

    def explode(*a, **k):
        raise Boom()

    import alpaca_jax.export.gguf_out as mod
    orig = mod._write_tensors
    mod._write_tensors = explode
    try:
        with pytest.raises(Boom):
            to_gguf(params, cfg, tok, tmp_path / "e.gguf", qtype="F16")
    finally:
        mod._write_tensors = orig
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sentencepiece_vocabulary_is_embedded(tmp_path):
    """A SentencePiece model (Mistral's 32k vocabulary) as a `llama` GGUF vocabulary: llama.cpp
    tokenizes as sentencepiece does, and the file loads back with the same tokenizer."""
    from test_tokenizers import TEXTS, _mistral_model_bytes

    from alpaca_jax import init_params
    from alpaca_jax.config import ModelConfig
    from alpaca_jax.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(_mistral_model_bytes(), chat_template="{{ messages }}")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, bos_token_id=tok.bos_id,
                      eos_token_ids=(tok.eos_id,))
    params = init_params(cfg, jax.random.PRNGKey(0), std=0.2)
    out = to_gguf(params, cfg, tok, tmp_path / "spm.gguf", qtype="F32")
    llm = _llama(out)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tok.encode(text, bos=False, parse_special=False), text
    _, cfg2, back = load_gguf(out)
    assert back.encode(TEXTS[3]) == tok.encode(TEXTS[3]) and back.chat_template == "{{ messages }}"
    assert (cfg2.bos_token_id, cfg2.num_layers) == (tok.bos_id, 2)
    ids = tok.encode(TEXTS[0] + " " + TEXTS[2])
    llm.eval(ids)
    assert_close_logits(np.asarray(llm.scores[:len(ids)], np.float32),
                  np.asarray(forward(params, np.array([ids]), cfg)[0][0]))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16}])
def test_rope_scaling_survives_export(tiny, tmp_path, scaling):
    """Linear scaling as metadata, llama3 scaling as llama.cpp's `rope_freqs.weight` divisors:
    llama.cpp reproduces the scaled model's logits over positions where scaling matters."""
    from hf_reference import to_jax

    tok = tiny[2]
    model = tiny_hf_model(seed=7, vocab=len(tiny_bpe_vocab()[0]), layers=2, hidden=64, heads=4,
                          kv_heads=2, inter=96, max_pos=256, rope_theta=500000.0,
                          rope_scaling=scaling)
    params, cfg = to_jax(model)
    assert cfg.rope_scaling is not None
    out = to_gguf(params, cfg, tok, tmp_path / "scaled.gguf", qtype="F32")
    ids = list(np.random.default_rng(3).integers(3, cfg.vocab_size, 60))
    llm = _llama(out)
    llm.eval(ids)
    assert_close_logits(np.asarray(llm.scores[:60], np.float32),
                  np.asarray(forward(params, np.array([ids]), cfg)[0][0]))
