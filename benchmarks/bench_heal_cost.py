"""Training cost of each healing objective, measured side by side: the train step of the
issue-20 ablation (20% PPL-pruned SmolLM2, LoRA r8 on all seven linears, dropout 0) by `sft`,
`kd`, `kd+sft`, and Q4_0 QAT by `sft` and `kd` (a float teacher). Prints; asserts nothing.

    python benchmarks/bench_heal_cost.py [--rounds 5] [--batch 4] [--accum 2] [--seq 256]

Why a benchmark of its own: the ablation's runs record their tokens/s, but on a shared machine
a run's figure depends on what else ran beside it. Here every objective's compiled step runs
in one process, interleaved round by round (one step of each per round), so a change of load
reaches every objective alike; the figure is the median over the rounds. The batch is random
tokens, every position a loss token, in the ablation's shape (`[accum, batch, seq]`); the
teacher is the unpruned model in float32, as in the ablation (`distill.teacher=stage:load`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PPL_20PCT = [3, 5, 12, 13, 14, 17]
ROWS = [("sft", "sft", None), ("kd", "kd", None), ("kd+sft", "kd+sft", None),
        ("QAT Q4_0, sft", "sft", "q4_0"), ("QAT Q4_0, kd", "kd", "q4_0")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    import jax
    import optax

    from alpaca_jax import load_model
    from alpaca_jax.model.adapters import adapted
    from alpaca_jax.peft import add_lora, is_adapter
    from alpaca_jax.provenance import git_sha, machine
    from alpaca_jax.prune import drop_layers
    from alpaca_jax.quant import FakeQuant, QuantSpec
    from alpaca_jax.train.distill import DistillConfig, make_teacher
    from alpaca_jax.train.split import split
    from alpaca_jax.train.step import make_train_step

    print(f"commit={git_sha()} machine={machine()}")
    teacher_params, tcfg, _ = load_model(args.model)
    pruned, cfg = drop_layers(teacher_params, tcfg, PPL_20PCT)
    params = add_lora(pruned, cfg, jax.random.PRNGKey(0), rank=8, alpha=16.0, dropout=0.0)
    trainable, frozen = split(params, is_adapter)
    rng = np.random.default_rng(0)
    A, B, T = args.accum, args.batch, args.seq
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (A, B, T), dtype=np.int32),
             "loss_mask": np.ones((A, B, T), np.float32),
             "segment_ids": np.ones((A, B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (A, B, T)).copy()}
    opt = optax.adamw(1e-4)
    steps = {}
    for name, objective, fmt in ROWS:
        teacher = make_teacher(DistillConfig(objective=objective), teacher_params, tcfg, cfg,
                               name="the unpruned model")
        materialize = adapted if fmt is None else FakeQuant.from_spec(QuantSpec(fmt), cfg)
        fn = make_train_step(cfg, opt, materialize,
                             objective=None if teacher is None else teacher.objective)
        t = jax.tree_util.tree_map(lambda x: x.copy(), trainable)
        state = opt.init(t)
        tp = None if teacher is None else teacher.params
        t0 = time.perf_counter()
        t, state, m = fn(t, frozen, state, batch, 0, tp)
        float(m["loss"])
        print(f"{name}: compiled and ran one step in {time.perf_counter() - t0:.1f} s",
              flush=True)
        steps[name] = [fn, t, state, tp, []]
    for r in range(args.rounds):
        for name, s in steps.items():
            fn, t, state, tp, times = s
            t0 = time.perf_counter()
            t, state, m = fn(t, frozen, state, batch, r + 1, tp)
            float(m["loss"])
            times.append(time.perf_counter() - t0)
            s[1], s[2] = t, state
    tokens = A * B * T
    print(f"\n{A} x {B} rows of {T} tokens a step ({tokens:,} loss positions), median of "
          f"{args.rounds} interleaved rounds\n")
    print("| objective | step s | tokens/s | step time / sft |\n|---|---:|---:|---:|")
    base = statistics.median(steps["sft"][4])
    for name, s in steps.items():
        sec = statistics.median(s[4])
        print(f"| {name} | {sec:.2f} | {tokens / sec:,.0f} | {sec / base:.2f} |")


if __name__ == "__main__":
    main()
