"""The evaluation suite (group `eval`): perplexity on text corpora, lm-evaluation-harness tasks
through our model (`alpaca_jax.eval.harness`, by `lm_eval.simple_evaluate`), and, given held-out
instruction data, its loss, generations and exact match. Inputs are read and checked by `prepare`
before any model work (task names, local task files and their data, request types);
`evaluate_suite` runs one model (any `materialize` transform) through it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_jax.paths import resolve_path


@dataclass
class Prepared:
    ppl_ids: dict = field(default_factory=dict)        # corpus name -> 1-D ids
    tasks: object = None                               # alpaca_jax.eval.lm_tasks.Resolved
    harness: dict = field(default_factory=dict)        # lm-eval version, task versions, n-shot
    val_rows: object = None                            # PackedRows of held-out examples
    val_records: list = field(default_factory=list)    # for generations / exact match
    synthetic: bool = False


def prepare(ev, tok, vocab_size: int, *, val_rows=None, val_records=(), synthetic=False):
    """Read corpora and resolve the lm-eval tasks (names, local files, data) up front."""
    import numpy as np

    from alpaca_jax.data.corpora import (check_token_ids, load_documents, load_token_ids,
                                         read_raw_text)
    from alpaca_jax.eval.lm_tasks import resolve_tasks

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
    if ev.task_limit is not None and ev.task_limit < 1:
        raise ValueError(f"eval.task_limit must be >= 1 or null, got {ev.task_limit}")
    if ev.tasks:
        p.tasks = resolve_tasks(ev.tasks, ev.include_path)   # before the model: fail fast
    return p


def evaluate_suite(params, cfg, tok, ev, prep: Prepared, *, materialize, eval_fn=None,
                   batch_size: int = 8, progress: bool = True) -> tuple[dict, list]:
    """(metrics, samples) of one model. Metric keys: `ppl_<corpus>`, `<task>/<metric>` and
    `<task>/<metric>_stderr` under the task's official name (`piqa/acc_norm`), `zeroshot_avg`
    (mean acc over the tasks), `val_loss`, `exact_match`, `eval_time_s`. The harness's
    provenance (versions, n-shot, limit) is left in `prep.harness`."""
    from alpaca_jax import generate
    from alpaca_jax.data.alpaca import format_prompt
    from alpaca_jax.data.synthetic import exact_match
    from alpaca_jax.eval import perplexity
    from alpaca_jax.eval.harness import AlpacaJaxLM
    from alpaca_jax.eval.lm_tasks import run_tasks
    from alpaca_jax.train.loop import evaluate_loss

    t0, m = time.time(), {}
    for name, ids in prep.ppl_ids.items():
        m[f"ppl_{name}"] = perplexity(params, cfg, ids, ctx_len=ev.ctx_len,
                                      batch_size=ev.batch_size, materialize=materialize)
    if prep.tasks is not None:
        lm = AlpacaJaxLM(params=params, cfg=cfg, tokenizer=tok, materialize=materialize,
                         batch_size=ev.task_batch_size)
        task_metrics, prep.harness = run_tasks(lm, prep.tasks, limit=ev.task_limit,
                                               num_fewshot=ev.num_fewshot,
                                               bootstrap_iters=ev.bootstrap_iters)
        m.update(task_metrics)
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
