"""Train-step time, throughput and peak memory: full fine-tuning vs LoRA / DoRA. Prints; asserts
nothing.

    python benchmarks/bench_train.py [--model smollm2-135m-instruct] [--methods full,lora,dora]
        [--dtypes float32] [--batch 4] [--seq 256] [--repeats 5] [--rank 8] [--remat]

Each (method, dtype) runs in its own process, so its peak RSS is its own. One jitted AdamW step
(forward, backward, update) on a batch of random tokens (every position a loss token), timed
after a compiling warm-up step, median of --repeats. LoRA/DoRA use the Shortened LLaMA recipe
(rank 8, alpha 16, dropout 0.05, all seven linear targets). Memory: peak RSS of the process
(includes loading the checkpoint, the same for every method), XLA's compiled temporaries of the
step, and the optimizer state.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def child(args) -> dict:
    import jax
    import optax

    from alpaca_jax import count_params, load_model
    from alpaca_jax.peft import add_lora, is_adapter
    from alpaca_jax.train.split import split, train_all
    from alpaca_jax.train.step import make_train_step

    params, cfg, _ = load_model(args.model)
    cfg = cfg.replace(compute_dtype=args.dtypes, remat=args.remat)
    pred = train_all
    if args.methods != "full":
        params = add_lora(params, cfg, jax.random.PRNGKey(0), rank=args.rank, alpha=16.0,
                          dropout=0.05, method=args.methods)
        pred = is_adapter
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (1, B, T), dtype=np.int32),
             "loss_mask": np.ones((1, B, T), np.float32),
             "segment_ids": np.ones((1, B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy()}
    trainable, frozen = split(params, pred)
    trainable = jax.tree_util.tree_map(lambda x: x.copy(), trainable)
    opt = optax.adamw(1e-4)
    state = opt.init(trainable)
    step = make_train_step(cfg, opt)
    t = time.perf_counter()
    compiled = step.lower(trainable, frozen, state, batch, 0).compile()
    mem = compiled.memory_analysis()
    trainable, state, m = step(trainable, frozen, state, batch, 0)
    float(m["loss"])
    compile_s = time.perf_counter() - t
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        trainable, state, m = step(trainable, frozen, state, batch, i + 1)
        float(m["loss"])
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    return {"step_s": sec, "tokens_s": B * T / sec, "compile_s": compile_s,
            "trainable": count_params(trainable), "params": count_params(params),
            "opt_state_mb": nbytes(state) / 2**20,
            "xla_temp_mb": getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", default="full,lora,dora")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    import jax

    from alpaca_jax.provenance import git_sha
    print(f"model={args.model} commit={git_sha()} cpus={os.cpu_count()} jax={jax.__version__}; "
          f"batch {args.batch} x {args.seq} tokens, AdamW, remat={args.remat}, median of "
          f"{args.repeats}; adapters: rank {args.rank}, alpha 16, dropout 0.05, 7 targets")
    print(f"{'method':6s} {'compute':9s} {'trainable':>11s} {'step s':>7s} {'tok/s':>7s} "
          f"{'peak RSS MB':>11s} {'XLA temp MB':>11s} {'opt state MB':>12s} {'compile s':>9s}")
    results = {}
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--methods",
                   method, "--dtypes", dtype, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--repeats", str(args.repeats), "--rank", str(args.rank)]
            cmd += ["--remat"] if args.remat else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(f"{method} {dtype} failed:\n{out.stderr[-2000:]}")
                continue
            r = results[method, dtype] = json.loads(line[-1][7:])
            print(f"{method:6s} {dtype:9s} {r['trainable']:11,d} {r['step_s']:7.2f} "
                  f"{r['tokens_s']:7.1f} {r['peak_rss_mb']:11.0f} {r['xla_temp_mb']:11.0f} "
                  f"{r['opt_state_mb']:12.1f} {r['compile_s']:9.1f}", flush=True)
        full = results.get(("full", dtype))
        for method in args.methods.split(","):
            r = results.get((method, dtype))
            if full and r and method != "full":
                print(f"{dtype}: {method} step time / full = {r['step_s'] / full['step_s']:.2f} "
                      f"(speed-up {full['step_s'] / r['step_s']:.2f}x); peak RSS "
                      f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f}x of full")


if __name__ == "__main__":
    main()
