"""The tokenizer as GGUF `tokenizer.ggml.*` metadata, the inverse of `tokenizer_from_gguf_fields`.

Byte-level BPE becomes `gpt2` with the `tokenizer.ggml.pre` name whose regexes llama.cpp applies
(`gpt2`, `smollm`, `llama-bpe`); SentencePiece becomes `llama` (pieces, scores, token types).
A vocabulary smaller than the embedding table is padded with unused `[PAD<i>]` pieces, as
convert_hf_to_gguf.py does, because llama.cpp sizes the vocabulary by the table.
"""
from __future__ import annotations

from alpaca_jax.config import ModelConfig
from alpaca_jax.tokenizer.bpe import DIGIT_SPLIT, GPT2_SPLIT, LLAMA3_SPLIT, ByteLevelBPETokenizer
from alpaca_jax.tokenizer.spm import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED,
                                      SentencePieceTokenizer, SpmVocabTokenizer)

_PRE_NAMES = {(GPT2_SPLIT,): "gpt2", (DIGIT_SPLIT, GPT2_SPLIT): "smollm",
              (LLAMA3_SPLIT,): "llama-bpe"}


def _spm_types(tok: SentencePieceTokenizer) -> list[int]:
    sp, out = tok.sp, []
    for i in range(sp.get_piece_size()):
        out.append(CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else
                   BYTE if sp.is_byte(i) else UNUSED if sp.is_unused(i) else NORMAL)
    return out


def tokenizer_kv(tok, cfg: ModelConfig) -> list[tuple[str, object]]:
    """(GGUFWriter method, value) pairs that embed `tok`; a clear error if it cannot be."""
    if tok is None:
        raise ValueError("to_gguf needs the model's tokenizer: llama.cpp cannot run a GGUF "
                         "without an embedded vocabulary")
    tok.check_model(cfg, "to_gguf")
    pieces = list(tok.pieces)
    if isinstance(tok, ByteLevelBPETokenizer):
        pre = _PRE_NAMES.get(tuple(tok.splits))
        if pre is None:
            raise ValueError(f"to_gguf: this BPE tokenizer's pre-tokenizer {tok.splits} has no "
                             f"llama.cpp equivalent; supported: {sorted(_PRE_NAMES.values())}")
        special = set(tok.special_ids)
        types = [CONTROL if i in special else NORMAL for i in range(len(pieces))]
        kv = [("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", pre),
              ("add_token_merges", list(tok.merges))]
        scores = None
    elif isinstance(tok, (SentencePieceTokenizer, SpmVocabTokenizer)):
        if isinstance(tok, SentencePieceTokenizer):
            types = _spm_types(tok)
            scores = [float(tok.sp.get_score(i)) for i in range(len(pieces))]
            kv = [("add_tokenizer_model", "llama"), ("add_add_space_prefix", True)]
        else:
            types, scores = list(tok.token_types), list(tok.scores)
            kv = [("add_tokenizer_model", "llama"),
                  ("add_add_space_prefix", bool(tok.add_space_prefix))]
        kv.append(("add_tokenizer_pre", "default"))
    else:
        raise ValueError(f"to_gguf: a {type(tok).__name__} cannot be embedded in a GGUF "
                         "(byte-level BPE or SentencePiece only)")
    for i in range(len(pieces), cfg.vocab_size):   # pad to the embedding table
        pieces.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    kv += [("add_token_list", pieces), ("add_token_types", types)]
    if scores is not None:
        kv.append(("add_token_scores", scores))
    for method, value in (("add_bos_token_id", tok.bos_id), ("add_eos_token_id", tok.eos_id),
                          ("add_pad_token_id", tok.pad_id), ("add_unk_token_id", tok.unk_id)):
        if value is not None:
            kv.append((method, int(value)))
    kv.append(("add_add_bos_token", bool(tok.add_bos)))
    if tok.chat_template:
        kv.append(("add_chat_template", tok.chat_template))
    return kv
