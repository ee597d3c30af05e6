"""Train-step throughput (tokens/s) of full fine-tuning on this machine. Prints; asserts nothing.

    python benchmarks/bench_train.py [--model smollm2-135m-instruct] [--batch 4] [--seq 256]
        [--repeats 5] [--dtypes float32,bfloat16] [--remat]

One jitted AdamW step (forward, backward, update) on a batch of packed rows of random tokens
(every position a loss token), timed after a compiling warm-up step, median of --repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--remat", action="store_true")
    args = ap.parse_args()

    import jax
    import optax

    from alpaca_jax import count_params, load_model
    from alpaca_jax.provenance import git_sha
    from alpaca_jax.train.split import split, train_all
    from alpaca_jax.train.step import make_train_step

    params, cfg, _ = load_model(args.model)
    rng = np.random.default_rng(0)
    B, T = args.batch, args.seq
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (1, B, T), dtype=np.int32),
             "loss_mask": np.ones((1, B, T), np.float32),
             "segment_ids": np.ones((1, B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy()}
    print(f"model={args.model} ({count_params(params) / 1e6:.1f}M params) commit={git_sha()} "
          f"cpus={os.cpu_count()} jax={jax.__version__}; batch {B} x {T} tokens, AdamW, "
          f"remat={args.remat}, median of {args.repeats}")
    for dtype in args.dtypes.split(","):
        c = cfg.replace(compute_dtype=dtype, remat=args.remat)
        trainable, frozen = split(params, train_all)
        trainable = jax.tree_util.tree_map(lambda x: x.copy(), trainable)
        opt = optax.adamw(1e-5)
        state = opt.init(trainable)
        step = make_train_step(c, opt)
        t = time.perf_counter()
        trainable, state, m = step(trainable, frozen, state, batch)
        float(m["loss"])
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            trainable, state, m = step(trainable, frozen, state, batch)
            float(m["loss"])
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        print(f"compute {dtype:9s} step {sec:7.2f} s   {B * T / sec:8.1f} tokens/s   "
              f"(first step incl. compile {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
