"""lm-eval tasks by name, resolved before any model work, and run through our model by
`lm_eval.simple_evaluate`.

Two suites (`conf/eval/`): OFFLINE, the task YAMLs of `tasks/` over the vendored data (lm-eval's
official prompts for piqa, arc_easy, boolq, copa, wsc273 and lambada_openai on llm-foundry's copies
of the same evaluation sets); PAPER, lm-eval's own tasks as Shortened LLaMA reports them (they
download their data from the Hugging Face Hub).

lm-eval itself loads the model before it looks at the tasks, and skips a local YAML it cannot
parse without a word (the task is then merely "not found"); `resolve_tasks` does both checks
first, with errors that name the task or the file.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from alpaca_jax.paths import resolve_path

TASK_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE = ("offline_piqa", "offline_arc_easy", "offline_boolq", "offline_copa", "offline_wsc273",
           "offline_lambada_openai")
PAPER = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# what `metric,filter` keys of lm-eval's results become in our metrics (stderr beside each)
_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "byte_perplexity",
            "bits_per_byte", "exact_match")


class TaskError(ValueError):
    """A task name that does not resolve, a task file that does not parse, or a task this model
    cannot serve."""


@dataclass
class Resolved:
    names: list[str]
    include_path: list[str]
    manager: object                 # lm_eval.tasks.TaskManager
    output_types: dict              # leaf task -> output_type (where known without a download)


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...] = (), defaults: bool = True):
    """lm-eval's TaskManager over ours (`tasks/`), `include_path` and, with `defaults`, lm-eval's
    own tasks; cached, as indexing lm-eval's ~15k YAMLs takes 10-20 s on 2 cores."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASK_DIR), *include_path], include_defaults=defaults)


def _check_yaml_files(dirs) -> None:
    """Every YAML in our task folders parses (lm-eval's index would skip it silently)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for d in dirs:
        for path in sorted(Path(d).rglob("*.yaml")):
            try:
                cfg = load_yaml(path, resolve_func=False, recursive=True)
            except Exception as e:   # yaml's and lm-eval's include errors, many types
                raise TaskError(f"{path}: not a valid lm-eval task file ({type(e).__name__}: "
                                f"{e})") from e
            if not isinstance(cfg, dict) or not ({"task", "group", "tag"} & set(cfg)):
                raise TaskError(f"{path}: not a valid lm-eval task file (a mapping with a "
                                f"'task' or 'group' key)")


def _leaves(tm, name: str, seen=()) -> list[tuple[str, dict | None]]:
    """(task name, its config as indexed) for every task a name stands for."""
    from lm_eval.tasks._index import Kind

    e = tm.task_index.get(name)
    if e is None or name in seen:
        return []
    if e.kind in (Kind.TASK, Kind.PY_TASK):
        return [(name, e.cfg)]
    if e.kind == Kind.TAG:
        return [(n, x.cfg) for n, x in tm.task_index.items() if name in x.tags]
    out = []
    for sub in (e.cfg or {}).get("task", []):
        if isinstance(sub, str):
            out += _leaves(tm, sub, (*seen, name))
        elif isinstance(sub, dict) and "task" in sub:
            out.append((str(sub["task"]), sub))
    return out


def resolve_tasks(names, include_path=(), check_data: bool = True) -> Resolved:
    """Check task names (lm-eval's "Tasks not found" wording), our task files, the data of the
    local tasks (`check_data`: building them reads and checks every record), and that each task
    asks only requests this model serves. Nothing here loads a model or downloads."""
    from alpaca_jax.eval.harness import SUPPORTED_OUTPUT_TYPES

    names = [str(n) for n in names]
    if not names:
        raise TaskError("no tasks named")
    include = [resolve_path(p) for p in include_path]
    for p in include:
        if not Path(p).is_dir():
            raise TaskError(f"include_path {p}: no such folder of task YAMLs")
    _check_yaml_files([TASK_DIR, *include])
    tm = task_manager(tuple(include), defaults=False)     # ours only: no 10-20 s index
    if not all(tm.match_tasks([n]) for n in names):
        tm = task_manager(tuple(include))
    missing = [n for n in names if not tm.match_tasks([n])]
    if missing:
        import difflib

        hints = {n: difflib.get_close_matches(n, tm.all_tasks, n=3) for n in missing}
        raise TaskError(f"Tasks not found: {', '.join(missing)}. "
                        + "; ".join(f"{n}: did you mean {', '.join(h)}?" for n, h in hints.items()
                                    if h)
                        + f" (the offline suite: {', '.join(OFFLINE)}; `python -m "
                        f"alpaca_jax.eval ls tasks` lists lm-eval's)")
    local_dirs = [TASK_DIR, *map(Path, include)]
    types, to_build = {}, []
    for name in names:
        for leaf, cfg in _leaves(tm, name):
            cfg = cfg or {}
            entry = tm.task_index.get(leaf)
            path = getattr(entry, "yaml_path", None)
            if path is not None and any(Path(path).is_relative_to(d) for d in local_dirs):
                to_build.append(leaf)
            otype = cfg.get("output_type", "generate_until")   # TaskConfig's default
            if otype not in SUPPORTED_OUTPUT_TYPES:
                raise TaskError(f"task {leaf!r} needs {otype!r} requests; the alpaca_jax model "
                                f"serves {', '.join(SUPPORTED_OUTPUT_TYPES)}")
            media = [k for k in ("doc_to_image", "doc_to_audio") if cfg.get(k)]
            if media:
                raise TaskError(f"task {leaf!r} sends {' and '.join(media)} inputs; the "
                                f"alpaca_jax model serves text only")
            types[leaf] = otype
    if check_data and to_build:
        tm.load(sorted(set(to_build)))     # reads each local task's data: a bad record fails
    return Resolved(names, include, tm, types)


def run_tasks(lm, resolved: Resolved, *, limit=None, num_fewshot=None,
              bootstrap_iters: int = 1000) -> tuple[dict, dict]:
    """(metrics, provenance) of one model over the resolved tasks. Metrics are keyed by each
    task's official name (its `task_alias`: `piqa/acc_norm`, `piqa/acc_norm_stderr`), plus
    `zeroshot_avg`, the mean acc over the tasks that have one."""
    import os

    import lm_eval

    # lm-eval bootstraps non-mean stderrs (perplexity) in a forked process pool; a fork of a
    # process running JAX's threads can deadlock (Python warns so), so it runs in-process
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(resolved.names),
                                  task_manager=resolved.manager, limit=limit,
                                  num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                  log_samples=False)
    metrics, tasks, accs = {}, {}, []
    groups = set(out.get("groups", {}))
    for name, res in out["results"].items():
        if name in groups:
            continue
        alias = (out["configs"].get(name, {}).get("task_alias") or name).strip()
        for key, v in res.items():
            metric, _, filt = key.partition(",")
            base = metric.removesuffix("_stderr")
            if base not in _METRICS or filt != "none" or not isinstance(v, (int, float)):
                continue
            metrics[f"{alias}/{metric}"] = float(v) if math.isfinite(v) else None
        if f"{alias}/acc" in metrics:
            accs.append(metrics[f"{alias}/acc"])
        n = out.get("n-samples", {}).get(name, {})
        tasks[alias] = {"task": name, "version": out.get("versions", {}).get(name),
                        "n_shot": out.get("n-shot", {}).get(name),
                        "n": n.get("effective"), "n_total": n.get("original"),
                        "output_type": out["configs"].get(name, {}).get("output_type")}
    if accs:
        metrics["zeroshot_avg"] = sum(accs) / len(accs)
    record = {"lm_eval_version": out.get("lm_eval_version"), "limit": limit,
              "num_fewshot": num_fewshot, "bootstrap_iters": bootstrap_iters,
              "include_path": resolved.include_path, "tasks": tasks}
    return metrics, record
