"""llm-foundry's in-context-learning JSONL formats, read and checked record by record, as the
datasets of the offline lm-eval tasks (`alpaca_jax/eval/tasks/*.yaml`):

- multiple choice `{"query", "choices", "gold"}`;
- schema `{"context_options", "continuation", "gold"}` (one continuation under each context);
- language modelling `{"context", "continuation"}`.

lm-eval reads a task's data only when the task is built; a bad record would then surface as a
Jinja or KeyError deep inside it. Here every record is checked first and an error names the
file and line.
"""
from __future__ import annotations

import json
from pathlib import Path

FORMATS = {"multiple_choice": ("query", "choices", "gold"),
           "schema": ("context_options", "continuation", "gold"),
           "language_modeling": ("context", "continuation")}


class TaskDataError(ValueError):
    """A local task's data file that is missing or not in the format its task expects."""


def _detect(rec: dict, where: str) -> str:
    for fmt, keys in FORMATS.items():
        if all(k in rec for k in keys):
            return fmt
    raise TaskDataError(f"{where}: keys {sorted(rec)} match none of the llm-foundry formats "
                        + "; ".join(f"{f} {list(k)}" for f, k in FORMATS.items()))


def _check(rec: dict, fmt: str, where: str) -> None:
    def fail(msg):
        raise TaskDataError(f"{where}: {msg}")

    if fmt == "language_modeling":
        if not (isinstance(rec["context"], str) and isinstance(rec["continuation"], str)
                and rec["continuation"].strip()):
            fail("context and continuation must be strings, the continuation non-empty")
        return
    key = "choices" if fmt == "multiple_choice" else "context_options"
    options = rec[key]
    if not (isinstance(options, list) and len(options) >= 2
            and all(isinstance(o, str) for o in options)):
        fail(f"{key} must be a list of at least 2 strings")
    gold = rec["gold"]
    if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(options)):
        fail(f"gold={gold!r} is not an index into the {len(options)} {key}")
    text = rec["query"] if fmt == "multiple_choice" else rec["continuation"]
    if not isinstance(text, str):
        fail("query/continuation must be a string")
    if fmt == "multiple_choice" and not all(o.strip() for o in options):
        fail("a choice is empty")


def read_records(path, expect: str | None = None) -> tuple[str, list[dict]]:
    """(format, records) of a JSONL file, every record checked; `expect` names the format the
    task's prompts are written for."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: no such task data file")
    if expect is not None and expect not in FORMATS:
        raise TaskDataError(f"{path}: format {expect!r} is not one of {sorted(FORMATS)}")
    fmt, records = None, []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise TaskDataError(f"{where}: expected a JSON object")
            this = _detect(rec, where)
            if this != (fmt or expect or this):
                raise TaskDataError(f"{where}: a {this} record in a {fmt or expect} file")
            fmt = this
            _check(rec, fmt, where)
            records.append(rec)
    if not records:
        raise TaskDataError(f"{path}: no records")
    return fmt, records


def load_dataset(data_file: str, format: str | None = None, split: str = "test", **_):
    """The `custom_dataset` of the offline task YAMLs: `{split: Dataset}` of the checked
    records. `data_file` is relative to the repository root (`alpaca_jax.paths`), so lm-eval
    finds it from any working directory. lm-eval also passes the task's metadata (version, the
    model's arguments) as keywords; they are not ours to read."""
    import datasets

    from alpaca_jax.paths import resolve_path

    _, records = read_records(resolve_path(data_file), format)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})
