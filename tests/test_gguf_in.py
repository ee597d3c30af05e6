"""GGUF import: tensors of every supported type, q/k un-permutation, metadata, tokenizer."""
import gguf
import numpy as np
import pytest
import torch

from alpaca_jax import forward, load_gguf, load_model
from alpaca_jax.io.gguf_in import permute_rope, unpermute_rope
from gguf_reference import hf_permute, roundtrip, tiny_bpe_vocab, write_tiny_gguf
from hf_reference import hf_logits, tiny_hf_model
from test_forward_parity import assert_close_logits

Q = gguf.GGMLQuantizationType
VOCAB = len(tiny_bpe_vocab()[0])


def _dequantized_reference(model, qtype):
    """The HF model with every 2-D weight replaced by its quantize->dequantize round trip."""
    if qtype == Q.F32:
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(roundtrip(p.numpy().astype(np.float32), qtype)))
    return model


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_gguf_logits_match_dequantized_hf_model(tmp_path, qtype, tie):
    model = tiny_hf_model(vocab=VOCAB, hidden=64, heads=4, kv_heads=2, inter=128, tie=tie)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(model, path, qtype)
    params, cfg, tok = load_gguf(path)
    assert cfg.tie_embeddings == tie and cfg.num_kv_heads == 2 and cfg.num_layers == 3
    ref = _dequantized_reference(model, qtype)
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 24))
    assert_close_logits(forward(params, tokens, cfg)[0], hf_logits(ref, tokens))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.RandomState(0).randn(6 * 8, 16).astype(np.float32)
    for heads in (6, 3, 1):
        np.testing.assert_array_equal(unpermute_rope(hf_permute(w, heads, heads), heads), w)
        np.testing.assert_array_equal(permute_rope(w, heads), hf_permute(w, heads, heads))


def test_gguf_tokenizer_and_chat_template(tmp_path):
    model = tiny_hf_model(vocab=VOCAB, hidden=32, heads=4, kv_heads=2, inter=64)
    write_tiny_gguf(model, tmp_path / "t.gguf")
    _, _, tok = load_gguf(tmp_path / "t.gguf")
    pieces, _ = tiny_bpe_vocab()
    ids = tok.encode(" the hello tell<|im_end|>")
    # merges by rank: "Ġ t", "h e", "Ġt he", "l l", "e ll"
    assert [pieces[i] for i in ids] == ["Ġthe", "Ġ", "he", "ll", "o", "Ġt", "ell",
                                        "<|im_end|>"]
    assert tok.decode(ids) == " the hello tell" and tok.eos_id == 2 and not tok.add_bos
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_load_model_accepts_a_gguf_path(tmp_path):
    model = tiny_hf_model(vocab=VOCAB)
    write_tiny_gguf(model, tmp_path / "m.gguf")
    params, cfg, _ = load_model(str(tmp_path / "m.gguf"))
    assert params["layers"]["wq"].shape == (3, 32, 32)
