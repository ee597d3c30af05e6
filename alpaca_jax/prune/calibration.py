"""Calibration token ids `[N, T]` for block scoring.

The paper's sampling (Shortened LLaMA's `get_examples`): draw a random document (Python's
`random`, seeded), tokenize it as the tokenizer does by default (BOS where the model's tokenizer
adds one), redraw until it has at least `seq_len` tokens and was not drawn before, then take a
random `seq_len` window of it. A window keeps BOS only when it starts at the document's first
token. Sources: a built-in corpus name, a local text file, a `datasets` hub name, or a
pre-tokenized `[N, T]` `.npy` file of token ids.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from alpaca_jax.data.corpora import check_token_ids, load_documents, load_token_ids


def sample_windows(docs: list[str], tokenizer, n: int = 10, seq_len: int = 128,
                   seed: int = 1234) -> np.ndarray:
    """`n` windows of `seq_len` tokens from distinct random documents of at least `seq_len`
    tokens (the paper's sampling; seed 1234 is the authors' default)."""
    if n < 1 or seq_len < 2:
        raise ValueError(f"calibration needs n >= 1 windows of seq_len >= 2 tokens; got n={n}, "
                         f"seq_len={seq_len}")
    if not docs:
        raise ValueError("calibration corpus has no documents")
    rng = random.Random(seed)
    lengths: dict[int, list[int]] = {}   # tokenized on first draw only
    used: set[int] = set()
    rows = []
    while len(rows) < n:
        i = rng.randint(0, len(docs) - 1)
        if i not in lengths:
            lengths[i] = tokenizer.encode(docs[i])
        if len(lengths[i]) >= seq_len and i not in used:
            used.add(i)
            ids = lengths[i]
            j = rng.randint(0, len(ids) - seq_len)
            rows.append(ids[j:j + seq_len])
        elif len(lengths) == len(docs) and not _enough(lengths, used, seq_len):
            long_docs = sum(len(v) >= seq_len for v in lengths.values())
            raise ValueError(f"calibration: {n} windows of {seq_len} tokens need {n} documents "
                             f"of at least {seq_len} tokens; the corpus has {long_docs} of "
                             f"{len(docs)}")
    return np.asarray(rows, np.int32)


def _enough(lengths, used, seq_len) -> bool:
    return any(len(v) >= seq_len and i not in used for i, v in lengths.items())


def calibration_ids(source, tokenizer=None, vocab_size: int | None = None, *, n: int = 10,
                    seq_len: int = 128, seed: int = 1234) -> np.ndarray:
    """Calibration ids `[N, T]` from an array, a `.npy` file of ids (used as is: its own N and T),
    or text (built-in corpus name, file, hub dataset; sampled as the paper does)."""
    if isinstance(source, np.ndarray):
        ids = check_calibration(source, vocab_size, "calibration ids")
    elif str(source).endswith(".npy"):
        ids = check_calibration(load_token_ids(Path(source), vocab_size), vocab_size, str(source))
    else:
        if tokenizer is None:
            raise ValueError(f"calibration from text ({source!r}) needs a tokenizer")
        ids = sample_windows(load_documents(str(source)), tokenizer, n, seq_len, seed)
    return check_calibration(ids, vocab_size, str(source))


def check_calibration(ids, vocab_size: int | None, source: str = "calibration ids") -> np.ndarray:
    """`[N, T]` integer ids with T >= 2 (a window needs a token to predict), inside the vocabulary."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{source}: expected an [N, T] integer array of token ids, got shape "
                         f"{ids.shape} dtype {ids.dtype}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"{source}: calibration rows need at least 2 tokens (one to predict); "
                         f"got shape {ids.shape}")
    return check_token_ids(ids.astype(np.int32), vocab_size, source)
