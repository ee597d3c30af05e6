"""Find and build the tokenizer that a checkpoint carries (HF directory or GGUF metadata)."""
from __future__ import annotations

import json
from pathlib import Path

from alpaca_jax.tokenizer.bpe import GGUF_PRE_SPLITS, ByteLevelBPETokenizer, splits_from_hf_pretokenizer
from alpaca_jax.tokenizer.spm import CONTROL, SentencePieceTokenizer, SpmVocabTokenizer


def _special_id(piece, vocab):
    if isinstance(piece, dict):  # transformers writes AddedToken dicts in old configs
        piece = piece.get("content")
    return None if piece is None else vocab.get(piece)


def load_hf_tokenizer(path: Path):
    """`tokenizer.model` (SentencePiece) or a byte-level BPE `tokenizer.json`; None if neither."""
    path = Path(path)
    cfg_file = path / "tokenizer_config.json"
    tcfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    template = tcfg.get("chat_template")
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    if (path / "tokenizer.model").exists():
        return SentencePieceTokenizer((path / "tokenizer.model").read_bytes(),
                                      add_bos=tcfg.get("add_bos_token", True),
                                      chat_template=template, source=str(path / "tokenizer.model"))
    tj_file = path / "tokenizer.json"
    if not tj_file.exists():
        return None
    tj = json.loads(tj_file.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"{tj_file}: only byte-level BPE tokenizer.json files are supported "
                         f"(found model type {model.get('type')!r}, byte_fallback="
                         f"{model.get('byte_fallback')}); SentencePiece models need tokenizer.model")
    vocab = dict(model["vocab"])
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    pieces = [None] * (max(vocab.values()) + 1)
    for p, i in vocab.items():
        pieces[i] = p
    missing = [i for i, p in enumerate(pieces) if p is None]
    if missing:
        raise ValueError(f"{tj_file}: vocabulary has no piece for ids {missing[:10]}")
    special = [t["id"] for t in tj.get("added_tokens", []) if t.get("special")]
    return ByteLevelBPETokenizer(
        pieces, model["merges"], splits_from_hf_pretokenizer(tj.get("pre_tokenizer"), str(tj_file)),
        special_ids=special, bos_id=_special_id(tcfg.get("bos_token"), vocab),
        eos_id=_special_id(tcfg.get("eos_token"), vocab),
        pad_id=_special_id(tcfg.get("pad_token"), vocab),
        unk_id=_special_id(tcfg.get("unk_token"), vocab),
        add_bos=tcfg.get("add_bos_token", False), chat_template=template)


def tokenizer_from_gguf_fields(fields: dict, source: str):
    """Build the tokenizer from GGUF `tokenizer.ggml.*` metadata (already decoded to Python)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError(f"{source}: GGUF has no tokenizer.ggml.model; no vocabulary embedded")
    pieces = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type", [1] * len(pieces))
    common = dict(bos_id=fields.get("tokenizer.ggml.bos_token_id"),
                  eos_id=fields.get("tokenizer.ggml.eos_token_id"),
                  pad_id=fields.get("tokenizer.ggml.padding_token_id"),
                  unk_id=fields.get("tokenizer.ggml.unknown_token_id"),
                  chat_template=fields.get("tokenizer.chat_template"))
    if kind == "gpt2":
        pre = fields.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_SPLITS:
            raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; "
                             f"supported: {sorted(GGUF_PRE_SPLITS)}")
        special = [i for i, t in enumerate(types) if t in (CONTROL, 4)]
        return ByteLevelBPETokenizer(pieces, fields["tokenizer.ggml.merges"], GGUF_PRE_SPLITS[pre],
                                     special_ids=special,
                                     add_bos=fields.get("tokenizer.ggml.add_bos_token", False),
                                     **common)
    if kind == "llama":
        return SpmVocabTokenizer(pieces, fields["tokenizer.ggml.scores"], types,
                                 add_space_prefix=fields.get("tokenizer.ggml.add_space_prefix", True),
                                 add_bos=fields.get("tokenizer.ggml.add_bos_token", True), **common)
    raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported (gpt2, llama)")
