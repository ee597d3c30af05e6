"""Byte-level BPE (GPT-2 family: SmolLM, LLaMA-3, ...), from a GGUF vocabulary or tokenizer.json."""
from __future__ import annotations

import functools

import regex

from alpaca_jax.tokenizer.base import Tokenizer

GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGIT_SPLIT = r"\p{N}"

# llama.cpp's `tokenizer.ggml.pre` names -> the pre-tokenizer regex sequence (llama-vocab.cpp).
GGUF_PRE_SPLITS = {
    "default": [GPT2_SPLIT], "gpt2": [GPT2_SPLIT], "gpt-2": [GPT2_SPLIT],
    "smollm": [DIGIT_SPLIT, GPT2_SPLIT], "starcoder": [DIGIT_SPLIT, GPT2_SPLIT],
    "refact": [DIGIT_SPLIT, GPT2_SPLIT], "codeshell": [DIGIT_SPLIT, GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT], "llama3": [LLAMA3_SPLIT], "smaug-bpe": [LLAMA3_SPLIT],
}


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class ByteLevelBPETokenizer(Tokenizer):
    kind = "byte-level BPE"

    def __init__(self, pieces, merges, splits, **kw):
        super().__init__(pieces=pieces, **kw)
        self.merges = list(merges)
        self.ranks = {}
        for n, m in enumerate(self.merges):
            pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            if len(pair) != 2:
                raise ValueError(f"BPE merge {n} is malformed: {m!r} (expected 'left right')")
            self.ranks[pair] = n
        self.splits = list(splits)
        self._split_res = [regex.compile(s) for s in self.splits]
        self._byte_enc = bytes_to_unicode()
        self._byte_dec = {c: b for b, c in self._byte_enc.items()}
        self._bpe_cached = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    def _pretokenize(self, text: str) -> list[str]:
        parts = [text]
        for rx in self._split_res:
            nxt = []
            for p in parts:  # isolate every match; keep unmatched stretches as their own parts
                pos = 0
                for m in rx.finditer(p):
                    if m.start() > pos:
                        nxt.append(p[pos:m.start()])
                    nxt.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    nxt.append(p[pos:])
            parts = nxt
        return parts

    def _bpe(self, word: str) -> tuple[int, ...]:
        symbols = list(word)
        while len(symbols) > 1:
            best, best_rank = None, None
            for i in range(len(symbols) - 1):
                r = self.ranks.get((symbols[i], symbols[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        try:
            return tuple(self.piece_to_id[s] for s in symbols)
        except KeyError as e:
            raise ValueError(f"BPE produced piece {e.args[0]!r} that is not in the vocabulary; "
                             "the merges do not belong to this vocabulary") from None

    def _encode_plain(self, text: str) -> list[int]:
        ids = []
        for part in self._pretokenize(text):
            ids.extend(self._bpe_cached("".join(self._byte_enc[b] for b in part.encode("utf-8"))))
        return ids

    def _piece_bytes(self, i: int) -> bytes:
        piece = self.pieces[i]
        try:
            return bytes(self._byte_dec[c] for c in piece)
        except KeyError:  # an added token stored as plain text
            return piece.encode("utf-8")

    def _hf_files(self) -> dict:
        pre = []
        for s in self.splits:
            if s == DIGIT_SPLIT:
                pre.append({"type": "Digits", "individual_digits": True})
            elif s == GPT2_SPLIT:
                pre.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                            "use_regex": True})
            else:
                pre.append({"type": "Split", "pattern": {"Regex": s}, "behavior": "Isolated",
                            "invert": False})
        if GPT2_SPLIT not in self.splits:
            pre.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                        "use_regex": False})
        added = [{"id": i, "content": self.pieces[i], "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True}
                 for i in sorted(self.special_ids)]
        tok_json = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": False,
                               "trim_offsets": False, "use_regex": False},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {p: i for i, p in enumerate(self.pieces)},
                      "merges": [list(m.split(" ")) if isinstance(m, str) else list(m)
                                 for m in self.merges]},
        }
        config = self.tokenizer_config() | {"tokenizer_class": "PreTrainedTokenizerFast"}
        return {"tokenizer.json": tok_json, "tokenizer_config.json": config}


def splits_from_hf_pretokenizer(pre: dict | None, source: str) -> list[str]:
    """Translate a tokenizer.json `pre_tokenizer` into our regex sequence."""
    if pre is None:
        raise ValueError(f"{source}: byte-level BPE without a pre_tokenizer is not supported")
    items = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    splits = []
    for p in items:
        kind = p.get("type")
        if kind == "Digits":
            splits.append(DIGIT_SPLIT if p.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if p.get("use_regex", True):
                splits.append(GPT2_SPLIT)
            if p.get("add_prefix_space"):
                raise ValueError(f"{source}: ByteLevel add_prefix_space=true is not supported")
        elif kind == "Split" and "Regex" in p.get("pattern", {}):
            if p.get("behavior", "Isolated") != "Isolated" or p.get("invert"):
                raise ValueError(f"{source}: Split pre-tokenizer {p} is not supported")
            splits.append(p["pattern"]["Regex"])
        else:
            raise ValueError(f"{source}: pre-tokenizer type {kind!r} is not supported "
                             "(supported: Digits, ByteLevel, Split with a Regex)")
    return splits
