"""SentencePiece vocabularies (LLaMA-1/2, Mistral): a `.model` file through the `sentencepiece`
library, or a vocabulary embedded in a GGUF through llama.cpp's SPM merge algorithm."""
from __future__ import annotations

import heapq

from alpaca_jax.tokenizer.base import Tokenizer

SPACE = "\u2581"  # ▁
# llama.cpp / GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class SentencePieceTokenizer(Tokenizer):
    """A `tokenizer.model` file, encoded and decoded by the `sentencepiece` library itself."""

    kind = "SentencePiece"

    def __init__(self, model_bytes: bytes, add_bos=True, chat_template=None, source="tokenizer.model"):
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:
            raise ValueError(f"{source}: not a valid SentencePiece model ({e})") from e
        n = self.sp.get_piece_size()
        opt = lambda i: None if i < 0 else i  # noqa: E731
        super().__init__(pieces=[self.sp.id_to_piece(i) for i in range(n)],
                         special_ids=[i for i in range(n) if self.sp.is_control(i)],
                         bos_id=opt(self.sp.bos_id()), eos_id=opt(self.sp.eos_id()),
                         pad_id=opt(self.sp.pad_id()), unk_id=opt(self.sp.unk_id()),
                         add_bos=add_bos, chat_template=chat_template)

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids, skip_special: bool = True) -> str:
        out, run = [], []
        for i in map(int, ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary "
                                 f"(size {self.vocab_size})")
            if i in self.special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.pieces[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def _hf_files(self) -> dict:
        config = self.tokenizer_config() | {"tokenizer_class": "LlamaTokenizer", "legacy": True}
        return {"tokenizer.model": self.model_bytes, "tokenizer_config.json": config}


class SpmVocabTokenizer(Tokenizer):
    """SPM BPE from pieces + scores + token types (a GGUF `llama` vocabulary), as llama.cpp's
    `llm_tokenizer_spm`: repeatedly merge the adjacent pair whose concatenation is the
    highest-scoring piece, then fall back to `<0xXX>` byte pieces for unknown characters."""

    kind = "SentencePiece (vocabulary)"

    def __init__(self, pieces, scores, token_types, add_space_prefix=True, **kw):
        special = [i for i, t in enumerate(token_types) if t in (CONTROL, USER_DEFINED)]
        super().__init__(pieces=pieces, special_ids=special, **kw)
        if not (len(pieces) == len(scores) == len(token_types)):
            raise ValueError(f"SPM vocabulary is inconsistent: {len(pieces)} pieces, "
                             f"{len(scores)} scores, {len(token_types)} token types")
        self.scores = [float(s) for s in scores]
        self.token_types = [int(t) for t in token_types]
        self.add_space_prefix = add_space_prefix
        self.byte_ids = {}
        for i, t in enumerate(self.token_types):
            if t == BYTE:
                self.byte_ids[int(pieces[i][3:5], 16)] = i

    def _encode_plain(self, text: str) -> list[int]:
        if self.add_space_prefix:
            text = " " + text
        symbols = list(text.replace(" ", SPACE))
        n = len(symbols)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap = []

        def push(left, right):
            if left < 0 or right < 0:
                return
            merged = symbols[left] + symbols[right]
            i = self.piece_to_id.get(merged)
            if i is not None:  # max-heap on score, ties to the leftmost pair (llama.cpp)
                heapq.heappush(heap, (-self.scores[i], left, right, len(merged)))

        for k in range(n - 1):
            push(k, k + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = symbols[left], symbols[right]
            if not a or not b or nxt[left] != right or len(a) + len(b) != size:
                continue  # stale: one side was merged away since this pair was queued
            symbols[left], symbols[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        ids = []
        k = 0
        while k >= 0 and k < n:
            s = symbols[k]
            i = self.piece_to_id.get(s)
            if i is not None:
                ids.append(i)
            else:
                for byte in s.encode("utf-8"):
                    if byte in self.byte_ids:
                        ids.append(self.byte_ids[byte])
                    elif self.unk_id is not None:
                        ids.append(self.unk_id)
                    else:
                        raise ValueError(f"character {s!r} has no piece, no byte fallback "
                                         "and the vocabulary has no unknown token")
            k = nxt[k]
        return ids

    def _piece_bytes(self, i: int) -> bytes:
        if self.token_types[i] == BYTE:
            return bytes([int(self.pieces[i][3:5], 16)])
        return self.pieces[i].replace(SPACE, " ").encode("utf-8")

    def _finish_decode(self, text: str) -> str:
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text

    def hf_merges(self) -> list[tuple[str, str]]:
        """BPE merges equivalent to the scores, derived as transformers' SentencePieceExtractor
        does: every split of a piece into two pieces, ordered by the merged piece's score."""
        vocab = self.piece_to_id
        merges = []
        for piece, pid in vocab.items():
            if self.token_types[pid] != NORMAL:
                continue
            local = [(piece[:k], piece[k:], self.scores[pid]) for k in range(1, len(piece))
                     if piece[:k] in vocab and piece[k:] in vocab]
            merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
        merges.sort(key=lambda x: x[2], reverse=True)
        return [(a, b) for a, b, _ in merges]

    def _hf_files(self) -> dict:
        added = [{"id": i, "content": self.pieces[i], "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True}
                 for i in sorted(self.special_ids)]
        normalizer = [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
        if self.add_space_prefix:
            normalizer.insert(0, {"type": "Prepend", "prepend": SPACE})
        decoder = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                   {"type": "ByteFallback"}, {"type": "Fuse"}]
        if self.add_space_prefix:
            decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        unk = None if self.unk_id is None else self.pieces[self.unk_id]
        tok_json = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizer},
            "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": decoder},
            "model": {"type": "BPE", "dropout": None, "unk_token": unk,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": dict(self.piece_to_id),
                      "merges": [list(m) for m in self.hf_merges()]},
        }
        config = self.tokenizer_config() | {"tokenizer_class": "PreTrainedTokenizerFast"}
        return {"tokenizer.json": tok_json, "tokenizer_config.json": config}
