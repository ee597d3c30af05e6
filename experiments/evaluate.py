"""Evaluate a model: perplexity on text corpora, lm-eval tasks, generations for a few prompts.

    python experiments/evaluate.py                         # SmolLM2-135M-Instruct, defaults
    python experiments/evaluate.py eval.max_tokens=16384 eval.ctx_len=1024
    python experiments/evaluate.py model.source=/path/to/hf_dir
    python experiments/evaluate.py eval=suite                # + the offline lm-eval tasks
    python experiments/evaluate.py eval=paper                # lm-eval's own tasks (Hub data)
    python experiments/evaluate.py run_dir=outputs/...      # a finished run's rebuilt model

Writes `results.json` (metrics, lm-eval provenance, resolved config, git SHA, versions, wall
time) in the run dir.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.app import hydra_app  # noqa: E402
from experiments.schema import EvaluateJob  # noqa: E402



def run(job: EvaluateJob, run_dir: Path, resolved: dict) -> dict:
    from alpaca_jax import count_params, generate, load_model
    from alpaca_jax.data.corpora import (check_token_ids, load_documents, load_token_ids,
                                         read_raw_text)
    from alpaca_jax.eval import perplexity
    from alpaca_jax.eval.lm_tasks import resolve_tasks, run_tasks
    from alpaca_jax.paths import resolve_path
    from alpaca_jax.io.registry import REGISTRY
    from alpaca_jax.model.adapters import adapted
    from alpaca_jax.provenance import git_sha, machine, versions, write_json_atomic

    t0 = time.time()
    sha = git_sha()  # the code this run started from, not whatever HEAD is when it ends
    raw = job.eval.raw_text
    def read(name):  # a .npy of token ids, the raw file, or its documents
        name = resolve_path(name)
        if name.endswith(".npy"):
            return load_token_ids(name)
        return read_raw_text(name) if raw else "\n\n".join(load_documents(name))

    texts = {name: read(name) for name in job.eval.corpora}  # before the model: fail fast
    # unknown names, bad task files and bad records fail here, before the model loads
    tasks = resolve_tasks(job.eval.tasks, job.eval.include_path) if job.eval.tasks else None
    materialize = adapted
    if job.run_dir:
        from alpaca_jax.eval.harness import _run_transform
        from alpaca_jax.io.run_model import load_run_model

        params, cfg, tok, recipe = load_run_model(job.run_dir)
        materialize = _run_transform(recipe, cfg)
    else:
        params, cfg, tok = load_model(job.model.source, job.model.param_dtype)
    cfg = cfg.replace(compute_dtype=job.model.compute_dtype, remat=job.model.remat,
                      attention=job.model.attention)
    print(f"loaded {job.run_dir or job.model.source}: {count_params(params) / 1e6:.1f}M "
          f"parameters, {cfg.num_layers} blocks", flush=True)
    metrics = {"params": count_params(params)}
    for name, text in texts.items():
        if isinstance(text, str):
            ids = tok.encode(text, bos=False, parse_special=raw)[: job.eval.max_tokens]
        else:  # pre-tokenized rows, read as one stream
            ids = check_token_ids(text, cfg.vocab_size, name).reshape(-1)[: job.eval.max_tokens]
        t = time.time()
        ppl = perplexity(params, cfg, ids, ctx_len=job.eval.ctx_len, batch_size=job.eval.batch_size,
                         materialize=materialize)
        metrics[f"ppl/{name}"] = ppl
        print(f"perplexity {name}: {ppl:.3f} ({len(ids)} tokens, ctx {job.eval.ctx_len}, "
              f"{time.time() - t:.0f}s)", flush=True)
    harness = None
    if tasks is not None:
        from alpaca_jax.eval.harness import AlpacaJaxLM

        t = time.time()
        lm = AlpacaJaxLM(params=params, cfg=cfg, tokenizer=tok, materialize=materialize,
                         batch_size=job.eval.task_batch_size,
                         name=job.run_dir or job.model.source)
        task_metrics, harness = run_tasks(lm, tasks, limit=job.eval.task_limit,
                                          num_fewshot=job.eval.num_fewshot,
                                          bootstrap_iters=job.eval.bootstrap_iters)
        metrics.update(task_metrics)
        for alias, info in harness["tasks"].items():
            shown = ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in task_metrics.items()
                              if k.startswith(alias + "/") and v is not None)
            print(f"lm-eval {alias} ({info['task']} v{info['version']}, {info['n']} of "
                  f"{info['n_total']} docs): {shown}", flush=True)
        print(f"lm-eval tasks: {time.time() - t:.0f}s", flush=True)
    answers = generate(params, cfg, tok, list(job.eval.prompts),
                       max_new_tokens=job.eval.max_new_tokens, chat=job.eval.chat,
                       materialize=materialize)
    samples = [{"prompt": p, "output": a} for p, a in zip(job.eval.prompts, answers)]
    for s in samples:
        print(f"> {s['prompt']}\n{s['output']}\n", flush=True)
    results = {
        "stage": "evaluate", "metrics": metrics, "samples": samples, "harness": harness,
        "run_dir": job.run_dir, "config": resolved,
        "model_note": REGISTRY[job.model.source].note if job.model.source in REGISTRY else None,
        "perplexity_protocol": ("raw file, special tokens parsed" if raw else
                                "documents without markup joined by blank lines")
        + ", no BOS, first max_tokens tokens, disjoint ctx_len windows, "
          "exp(total NLL / scored tokens)",
        "git_sha": sha, "versions": versions(), "machine": machine(),
        "wall_time_s": round(time.time() - t0, 1),
    }
    write_json_atomic(run_dir / "results.json", results)
    print(f"wrote {run_dir / 'results.json'}")
    return results


main = hydra_app("evaluate", EvaluateJob, run)

if __name__ == "__main__":
    main()
