"""Alpaca-schema instruction data: records, the Stanford Alpaca prompt templates, and
tokenization with the loss on response tokens only."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Verbatim from Stanford Alpaca's train.py (PROMPT_DICT).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(record: dict) -> str:
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def validate_records(records, source: str) -> list[dict]:
    """Every record must be a dict with string `instruction` and `output` (and optional string
    `input`); the error names the source and the record index."""
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a list of records, got {type(records).__name__}")
    out = []
    for n, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{source}: record {n} is {type(r).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{source}: record {n} has no string field {key!r} "
                                 f"(keys: {sorted(r)})")
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise ValueError(f"{source}: record {n} field 'input' must be a string")
        if not r["instruction"].strip():
            raise ValueError(f"{source}: record {n} has an empty instruction")
        out.append({"instruction": r["instruction"], "input": r.get("input") or "",
                    "output": r["output"]})
    if not out:
        raise ValueError(f"{source}: no records")
    return out


def load_records(source: str, split: str = "train") -> list[dict]:
    """Alpaca records from a local .json (list) or .jsonl file, or a hub dataset name
    (`tatsu-lab/alpaca`, `yahma/alpaca-cleaned`) through `datasets`."""
    path = Path(source).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            records = []
            for n, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n + 1} is not valid JSON ({e})") from e
        else:
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        return validate_records(records, str(path))
    if path.suffix or source.startswith((".", "/")):
        raise FileNotFoundError(f"{source}: no such instruction data file")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise ValueError(f"instruction data {source!r}: not a file and `datasets` could not "
                         f"load it: {e}") from e
    return validate_records([dict(r) for r in ds], source)


@dataclass
class EncodedSet:
    ids: list[np.ndarray]          # per example token ids
    loss_mask: list[np.ndarray]    # 1.0 on response tokens (and EOS), 0.0 on the prompt
    n_truncated: int = 0           # cut at the cutoff (their EOS is lost with the tail)
    dropped: list[int] = field(default_factory=list)  # indices with no response token left

    def __len__(self):
        return len(self.ids)


def encode_records(tokenizer, records: list[dict], cutoff_len: int) -> EncodedSet:
    """Prompt + response + EOS, truncated to `cutoff_len`. A record whose prompt alone fills the
    cutoff has nothing to learn from; it is dropped and listed in `dropped`, never silently."""
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token; Alpaca training appends EOS")
    out = EncodedSet([], [])
    for n, r in enumerate(records):
        prompt = tokenizer.encode(format_prompt(r))
        response = tokenizer.encode(r["output"], bos=False) + [tokenizer.eos_id]
        ids = np.asarray(prompt + response, np.int32)
        mask = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(response), np.float32)])
        if ids.size > cutoff_len:
            ids, mask = ids[:cutoff_len], mask[:cutoff_len]
            out.n_truncated += 1
        if mask.sum() == 0:
            out.dropped.append(n)
            continue
        out.ids.append(ids)
        out.loss_mask.append(mask)
    return out


def split_records(records: list[dict], val_size: int, seed: int):
    """A seeded held-out split: (train, val)."""
    if not 0 <= val_size < len(records):
        raise ValueError(f"val_size={val_size} must be in [0, {len(records)})")
    order = np.random.default_rng(seed).permutation(len(records))
    val = [records[i] for i in sorted(order[:val_size])]
    train = [records[i] for i in sorted(order[val_size:])]
    return train, val
