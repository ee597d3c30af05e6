"""Loglikelihood requests per second: our lm-eval model vs lm-eval's own `hf` model (torch) on
SmolLM2-135M-Instruct, on the same requests lm-eval builds from the offline tasks, in one run on
this CPU. Prints figures and the agreement of the two (largest log-likelihood difference, acc /
acc_norm per task); asserts nothing.

    python benchmarks/bench_harness.py [--tasks offline_piqa,offline_arc_easy] [--limit 50]
        [--batch-size 8]

Each model is warmed up on the first batch's worth of requests first, so compilation (ours) is
timed apart from the steady state; both run fp32 on all cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="offline_piqa,offline_arc_easy")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import numpy as np
    from lm_eval.models.huggingface import HFLM

    from alpaca_jax import load_model, save_hf
    from alpaca_jax.eval.harness import AlpacaJaxLM
    from alpaca_jax.eval.lm_tasks import resolve_tasks

    names = args.tasks.split(",")
    tm = resolve_tasks(names).manager
    tasks = tm.load(names)["tasks"]
    reqs, owner = [], []
    for name, task in tasks.items():
        task.build_all_requests(limit=args.limit, rank=0, world_size=1)
        reqs += task.instances
        owner += [name] * len(task.instances)
    params, cfg, tok = load_model("smollm2-135m-instruct")
    ours = AlpacaJaxLM(params=params, cfg=cfg, tokenizer=tok, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as d:
        save_hf(params, cfg, tok, d)
        hf = HFLM(pretrained=d, device="cpu", dtype="float32", batch_size=args.batch_size)
        out = {}
        for label, lm in (("alpaca_jax", ours), ("hf", hf)):
            t = time.time()
            lm.loglikelihood(reqs[:args.batch_size * 4], disable_tqdm=True)
            warm = time.time() - t
            t = time.time()
            res = lm.loglikelihood(reqs, disable_tqdm=True)
            dt = time.time() - t
            out[label] = res
            print(f"{label}: {len(reqs)} requests in {dt:.1f} s = {len(reqs) / dt:.2f} "
                  f"requests/s (warm-up on {args.batch_size * 4}: {warm:.1f} s)", flush=True)
    a = np.array([r[0] for r in out["alpaca_jax"]])
    b = np.array([r[0] for r in out["hf"]])
    print(f"largest |log-likelihood difference|: {np.abs(a - b).max():.2e}; greedy flags equal: "
          f"{[r[1] for r in out['alpaca_jax']] == [r[1] for r in out['hf']]}")
    for name, task in tasks.items():
        for label in out:
            idx = [i for i, o in enumerate(owner) if o == name]
            for i, inst in zip(idx, (reqs[i] for i in idx)):
                inst.resps = [out[label][i]]
            task.apply_filters()
            accs = [task.process_results(doc, [r.filtered_resps["none"] for r in rs])
                    for doc, rs in _by_doc(task)]
            summary = {k: np.mean([x[k] for x in accs]) for k in accs[0] if k.startswith("acc")}
            print(f"{name} {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    print(f"load average during the run: {os.getloadavg()}")


def _by_doc(task):
    docs = {}
    for inst in task.instances:
        docs.setdefault(inst.doc_id, (inst.doc, []))[1].append(inst)
    return [(d, sorted(rs, key=lambda r: r.idx)) for d, rs in docs.values()]


if __name__ == "__main__":
    main()
