"""The evaluation suite (group `eval`): perplexity on text corpora, zero-shot accuracy on
llm-foundry JSONL files, and, given held-out instruction data, its loss, generations and exact
match. Inputs are read and checked by `prepare` before any model work; `evaluate_suite` runs
one model (any `materialize` transform) through it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_jax.paths import resolve_path


@dataclass
class Prepared:
    ppl_ids: dict = field(default_factory=dict)        # corpus name -> 1-D ids
    zeroshot: dict = field(default_factory=dict)       # task name -> path
    val_rows: object = None                            # PackedRows of held-out examples
    val_records: list = field(default_factory=list)    # for generations / exact match
    synthetic: bool = False


def prepare(ev, tok, vocab_size: int, *, val_rows=None, val_records=(), synthetic=False):
    """Read corpora and check every zero-shot file (format, each record) up front."""
    import numpy as np

    from alpaca_jax.data.corpora import (check_token_ids, load_documents, load_token_ids,
                                         read_raw_text)
    from alpaca_jax.eval.zeroshot import read_tasks

    p = Prepared(val_rows=val_rows, val_records=list(val_records), synthetic=synthetic)
    for name in ev.corpora:
        if name.endswith(".npy"):
            ids = check_token_ids(load_token_ids(resolve_path(name)), vocab_size, name)
        else:
            text = (read_raw_text(resolve_path(name)) if ev.raw_text
                    else "\n\n".join(load_documents(resolve_path(name))))
            ids = np.asarray(tok.encode(text, bos=False, parse_special=ev.raw_text))
        p.ppl_ids[Path(name).stem if name.endswith(".npy") else name] = \
            ids.reshape(-1)[: ev.max_tokens]
    if ev.zeroshot_limit is not None and ev.zeroshot_limit < 1:
        raise ValueError(f"eval.zeroshot_limit must be >= 1 or null, got {ev.zeroshot_limit}")
    for f in ev.zeroshot:
        path = resolve_path(f)
        read_tasks(path, ev.zeroshot_limit)           # a malformed record fails here
        name = Path(f).stem
        if name in p.zeroshot:
            raise ValueError(f"eval.zeroshot lists two files named {name}")
        p.zeroshot[name] = path
    return p


def evaluate_suite(params, cfg, tok, ev, prep: Prepared, *, materialize, eval_fn=None,
                   batch_size: int = 8, progress: bool = True) -> tuple[dict, list]:
    """(metrics, samples) of one model. Metric keys: `ppl_<corpus>`, `<task>/acc`,
    `<task>/acc_norm`, `zeroshot_avg` (mean acc over the tasks), `val_loss`, `exact_match`,
    `eval_time_s`."""
    from alpaca_jax import generate
    from alpaca_jax.data.alpaca import format_prompt
    from alpaca_jax.data.synthetic import exact_match
    from alpaca_jax.eval import perplexity, zeroshot
    from alpaca_jax.train.loop import evaluate_loss

    t0, m = time.time(), {}
    for name, ids in prep.ppl_ids.items():
        m[f"ppl_{name}"] = perplexity(params, cfg, ids, ctx_len=ev.ctx_len,
                                      batch_size=ev.batch_size, materialize=materialize)
    accs = []
    for name, path in prep.zeroshot.items():
        r = zeroshot(params, cfg, tok, path, ev.zeroshot_limit,
                     batch_size=ev.zeroshot_batch_size, materialize=materialize,
                     progress=progress)
        m.update({f"{name}/{k}": v for k, v in r.items() if k != "format"})
        accs.append(r["acc"])
    if accs:
        m["zeroshot_avg"] = sum(accs) / len(accs)
    if prep.val_rows is not None and eval_fn is not None:
        m["val_loss"] = evaluate_loss(params, prep.val_rows, eval_fn, batch_size)
    samples = []
    recs = prep.val_records[: ev.instruction_samples]
    if recs:
        outs = generate(params, cfg, tok, [format_prompt(r) for r in recs],
                        max_new_tokens=ev.max_new_tokens, materialize=materialize)
        if prep.synthetic:
            m["exact_match"] = exact_match(outs, recs)
        samples += [{"prompt": r["instruction"] + (" | " + r["input"] if r["input"] else ""),
                     "reference": r["output"], "output": o} for r, o in zip(recs, outs)]
    if ev.prompts:
        outs = generate(params, cfg, tok, list(ev.prompts), max_new_tokens=ev.max_new_tokens,
                        chat=ev.chat, materialize=materialize)
        samples += [{"prompt": p, "output": o} for p, o in zip(ev.prompts, outs)]
    m["eval_time_s"] = round(time.time() - t0, 1)
    return m, samples
