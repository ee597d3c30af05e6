"""The one tokenizer interface: `encode(text, bos=...)`, `decode(ids)`, special ids, chat template.

Subclasses implement `_encode_plain` (text with no special tokens in it) and `_piece_bytes`.
Special tokens written literally in the text (`<|im_start|>`) are matched first, as
`transformers` and llama.cpp do, so chat prompts tokenize the same way everywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import regex


class Tokenizer:
    kind = "base"

    def __init__(self, *, pieces: list[str], special_ids, bos_id, eos_id, pad_id=None,
                 unk_id=None, add_bos=False, chat_template=None):
        self.pieces = list(pieces)
        self.special_ids = frozenset(int(i) for i in special_ids)
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.piece_to_id = {p: i for i, p in enumerate(self.pieces)}
        specials = sorted((self.pieces[i] for i in self.special_ids), key=len, reverse=True)
        self._special_re = (regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
                            if specials else None)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, bos: bool | None = None, eos: bool = False,
               parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        if (self.add_bos if bos is None else bos):
            if self.bos_id is None:
                raise ValueError(f"{self.kind} tokenizer has no BOS token but bos=True was asked")
            ids.append(self.bos_id)
        chunks = (self._special_re.split(text) if parse_special and self._special_re else [text])
        for n, chunk in enumerate(chunks):
            if not chunk:
                continue
            if n % 2 == 1:  # odd chunks are the captured special tokens
                ids.append(self.piece_to_id[chunk])
            else:
                ids.extend(self._encode_plain(chunk))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of a stretch of text that is either the first or follows a special token."""
        raise NotImplementedError

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, ids, skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary "
                                 f"(size {self.vocab_size})")
            if i in self.special_ids:
                if not skip_special:
                    out += self.pieces[i].encode("utf-8")
                continue
            out += self._piece_bytes(i)
        return self._finish_decode(out.decode("utf-8", errors="replace"))

    def _piece_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def _finish_decode(self, text: str) -> str:
        return text

    # -- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from alpaca_jax.tokenizer.chat import render_chat

        if not self.chat_template:
            raise ValueError(f"this {self.kind} tokenizer has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self._piece_or_empty(self.bos_id),
                           eos_token=self._piece_or_empty(self.eos_id))

    def _piece_or_empty(self, i):
        return "" if i is None else self.pieces[i]

    # -- consistency -------------------------------------------------------------------------
    def check_model(self, cfg, source: str = "tokenizer") -> None:
        """Raise if this tokenizer cannot belong to a model with config `cfg`.

        Checkpoints pad their embedding table past the tokenizer by a few percent at most
        (to a multiple of 64 or 128), so a tokenizer 10% smaller than the table is a mismatch.
        """
        n, v = self.vocab_size, cfg.vocab_size
        if n > v or n < 0.9 * v:
            raise ValueError(f"{source}: tokenizer has {n} tokens but the model's embedding "
                             f"table has {v} rows; the tokenizer does not belong to this model")
        for name in ("bos_id", "eos_id"):
            i = getattr(self, name)
            if i is not None and i >= v:
                raise ValueError(f"{source}: tokenizer {name}={i} is outside the model's "
                                 f"vocabulary of {v}")

    # -- saving ------------------------------------------------------------------------------
    def tokenizer_config(self) -> dict:
        """The `tokenizer_config.json` fields transformers needs beside the vocabulary file."""
        cfg = {"bos_token": self._piece_or_none(self.bos_id),
               "eos_token": self._piece_or_none(self.eos_id),
               "pad_token": self._piece_or_none(self.pad_id),
               "unk_token": self._piece_or_none(self.unk_id),
               "add_bos_token": self.add_bos, "add_eos_token": False,
               "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg

    def _piece_or_none(self, i):
        return None if i is None else self.pieces[i]

    def save_hf(self, path: Path) -> None:
        path = Path(path)
        for fname, content in self._hf_files().items():
            target = path / fname
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(json.dumps(content, indent=2, ensure_ascii=False))

    def _hf_files(self) -> dict:
        raise NotImplementedError
