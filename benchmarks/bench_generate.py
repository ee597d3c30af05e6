"""Prefill and greedy-generation throughput of the JAX model vs transformers (torch fp32) on
the same machine, in one run. Prints figures; asserts nothing.

    python benchmarks/bench_generate.py [--model smollm2-135m-instruct] [--prompt-len 256]
        [--new-tokens 128] [--repeats 5]

Both sides: batch 1, fp32, greedy, exactly --new-tokens tokens (EOS ignored), timed after a
warm-up call (JAX compile time reported separately), median of --repeats runs, the JAX and
torch runs interleaved so that machine drift affects both alike.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time

import numpy as np


def _interleaved_medians(fns, repeats):
    """Median seconds of each fn, calling them in turn so that machine drift hits all alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import jax
    import torch
    import transformers

    from alpaca_jax import forward, generate_ids, load_model, save_hf
    from alpaca_jax.data.corpora import load_documents

    params, cfg, tok = load_model(args.model)
    docs = "\n\n".join(load_documents("wiki")[:20])
    prompt = tok.encode(docs, bos=False)[: args.prompt_len]
    short = prompt[:16]
    n_new = args.new_tokens

    # -- JAX ---------------------------------------------------------------------------------
    fwd = jax.jit(lambda p, t: forward(p, t, cfg)[0])
    tokens = jax.numpy.asarray([prompt])
    t0 = time.perf_counter()
    fwd(params, tokens).block_until_ready()
    jax_prefill_compile = time.perf_counter() - t0

    gen = lambda: generate_ids(params, cfg, [short], n_new, eos_ids=())  # noqa: E731
    t0 = time.perf_counter()
    out = gen()
    jax_gen_compile = time.perf_counter() - t0
    assert len(out[0]) == n_new

    # -- torch (transformers) on the same weights ----------------------------------------------
    with tempfile.TemporaryDirectory() as d:
        save_hf(params, cfg, tok, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    pt_tokens = torch.tensor([prompt])
    pt_short = torch.tensor([short])

    def pt_prefill():
        with torch.no_grad():
            hf(pt_tokens)

    def pt_gen():
        with torch.no_grad():
            o = hf.generate(pt_short, max_new_tokens=n_new, min_new_tokens=n_new,
                            do_sample=False, pad_token_id=0)
        assert o.shape[1] == len(short) + n_new

    pt_prefill()
    pt_gen()
    jax_prefill, torch_prefill, jax_gen, torch_gen = _interleaved_medians(
        [lambda: fwd(params, tokens).block_until_ready(), pt_prefill, gen, pt_gen], args.repeats)

    # greedy outputs should agree (same weights, fp32); report how many leading tokens match
    with torch.no_grad():
        pt_ids = hf.generate(pt_short, max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0)[0, len(short):].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(out[0], pt_ids)) if a != b), n_new)

    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        sha = "unknown"
    print(f"model={args.model} commit={sha} machine={platform.machine()} cores={os.cpu_count()} "
          f"jax={jax.__version__} torch={torch.__version__} threads(torch)={torch.get_num_threads()}")
    print(f"prefill: batch 1 x {len(prompt)} tokens; generation: {len(short)}-token prompt + "
          f"{n_new} greedy tokens; median of {args.repeats}")
    print(f"{'':24s}{'JAX':>12s}{'torch':>12s}{'JAX/torch':>12s}")
    jp, tp = len(prompt) / jax_prefill, len(prompt) / torch_prefill
    jg, tg = n_new / jax_gen, n_new / torch_gen
    print(f"{'prefill tokens/s':24s}{jp:12.1f}{tp:12.1f}{jp / tp:12.2f}")
    print(f"{'generation tokens/s':24s}{jg:12.1f}{tg:12.1f}{jg / tg:12.2f}")
    print(f"JAX compile: prefill {jax_prefill_compile:.1f}s, generate {jax_gen_compile:.1f}s; "
          f"greedy tokens identical to torch for the first {agree}/{n_new}")


if __name__ == "__main__":
    main()
