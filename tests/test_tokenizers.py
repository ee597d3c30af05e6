"""Tokenizers against the libraries that define them: sentencepiece and HF tokenizers."""
import importlib.util
from pathlib import Path

import pytest
import sentencepiece as spm

from alpaca_jax.tokenizer import SentencePieceTokenizer, SpmVocabTokenizer
from alpaca_jax.tokenizer.load import load_hf_tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and  double  spaces ",
    "Numbers 1234567 and 3.14159, dates 2024-02-05.",
    "Unicode: naïve café, Straße, Ελληνικά, 日本語のテキスト, emoji 🦙🚀",
    "tabs\tand\nnewlines\n\n\nend",
    "def f(x):\n    return x ** 2  # code",
    "<s> literal special markers </s> in text",
    "",
]


def _mistral_model_bytes() -> bytes:
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None, "mistral-common missing: pip install --no-deps -r requirements/assets.txt"
    return (Path(spec.origin).parent / "data" / "tokenizer.model.v1").read_bytes()


@pytest.fixture(scope="module")
def sp():
    proc = spm.SentencePieceProcessor()
    proc.LoadFromSerializedProto(_mistral_model_bytes())
    return proc


def _vocab_tokenizer(sp):
    types = []
    for i in range(sp.get_piece_size()):
        types.append(6 if sp.is_byte(i) else 3 if sp.is_control(i) else
                     2 if sp.is_unknown(i) else 1)
    return SpmVocabTokenizer([sp.id_to_piece(i) for i in range(sp.get_piece_size())],
                             [sp.get_score(i) for i in range(sp.get_piece_size())], types,
                             bos_id=sp.bos_id(), eos_id=sp.eos_id(), unk_id=sp.unk_id(),
                             add_bos=True)


@pytest.mark.parametrize("text", TEXTS)
def test_spm_file_tokenizer_equals_sentencepiece(sp, text):
    tok = SentencePieceTokenizer(_mistral_model_bytes())
    # `parse_special=False`: sentencepiece itself never parses "<s>" written in the text
    assert tok.encode(text, bos=False, parse_special=False) == sp.encode(text)
    assert tok.encode(text)[0] == sp.bos_id()
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


@pytest.mark.parametrize("text", TEXTS)
def test_spm_vocab_merges_equal_sentencepiece(sp, text):
    """llama.cpp's SPM algorithm over pieces+scores (a GGUF 'llama' vocabulary) reproduces the
    sentencepiece library, byte fallback included."""
    tok = _vocab_tokenizer(sp)
    assert tok.encode(text, bos=False, parse_special=False) == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_spm_vocab_saved_as_tokenizer_json_loads_in_transformers(sp, tmp_path):
    from transformers import AutoTokenizer

    tok = _vocab_tokenizer(sp)
    tok.save_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS[:-2]:
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text), text


def test_spm_file_saved_loads_back(sp, tmp_path):
    tok = SentencePieceTokenizer(_mistral_model_bytes(), chat_template="{{ messages[0]['content'] }}")
    tok.save_hf(tmp_path)
    back = load_hf_tokenizer(tmp_path)
    assert isinstance(back, SentencePieceTokenizer)
    assert back.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert back.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def _train_bpe(tmp_path):
    """A small byte-level BPE trained by HF tokenizers itself, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for t in TEXTS if t] * 20 + ["the quick brown fox jumps over the lazy dog"] * 50
    t.train_from_iterator(corpus, trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"eos_token": "<|im_end|>", "bos_token": null, "add_bos_token": false}')
    return t


def test_bpe_tokenizer_json_equals_hf_tokenizers(tmp_path):
    ref = _train_bpe(tmp_path)
    tok = load_hf_tokenizer(tmp_path)
    for text in TEXTS + ["the lazy dog<|im_end|>", "über 42 fox🦊"]:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text.replace("<|im_end|>", "")
    assert tok.eos_id == ref.token_to_id("<|im_end|>")
    # and what we save, tokenizers loads and encodes identically
    out = tmp_path / "saved"
    out.mkdir()
    tok.save_hf(out)
    from tokenizers import Tokenizer
    again = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert again.encode(text).ids == ref.encode(text).ids, text


def test_unknown_tokenizer_json_kind_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": []}}')
    with pytest.raises(ValueError, match="tokenizer.json.*Unigram"):
        load_hf_tokenizer(tmp_path)
