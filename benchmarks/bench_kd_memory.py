"""Memory of the loss, whole sequence vs chunked: XLA's compiled memory analysis of one
micro-batch's gradient at SmolLM2's vocabulary, for the next-token loss (`train.loss_chunk`)
and the distillation loss (`distill.chunk`, teacher forward included). Prints figures; asserts
nothing (tests/test_train.py and tests/test_distill.py check that both paths give the same loss
and gradient).

    python benchmarks/bench_kd_memory.py [--batch 8] [--seq-len 256] [--chunks 0,64]

The model is small (2 blocks, d=64) so that the vocabulary-wide logits dominate, as they do
once the batch is large enough; the figures are the temporaries XLA allocates, parameters and
inputs excluded.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chunks", default="0,64")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from alpaca_jax import ModelConfig, init_params
    from alpaca_jax.train.distill import Objective, distill_sums, teacher_outputs
    from alpaca_jax.train.step import loss_sums

    V, B, T = args.vocab, args.batch, args.seq_len
    cfg = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    batch = {"tokens": jnp.zeros((B, T), jnp.int32), "loss_mask": jnp.ones((B, T)),
             "segment_ids": jnp.ones((B, T), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T), (B, T))}
    print(f"V={V} B={B} T={T}: one [B, T, V] float32 tensor is {B * T * V * 4 / 2**20:.0f} MiB")
    for chunk in (int(c) for c in args.chunks.split(",")):
        mem = jax.jit(jax.grad(lambda p, chunk=chunk: loss_sums(p, batch, cfg, chunk=chunk)[0])
                      ).lower(params).compile().memory_analysis()
        print(f"next-token loss, train.loss_chunk={chunk}: "
              f"{mem.temp_size_in_bytes / 2**20:.0f} MiB of temporaries")
    for chunk in (int(c) for c in args.chunks.split(",")):
        obj = Objective("kd", 1.0, 0.0, chunk, cfg)

        def grads(s, t, obj=obj):
            out = teacher_outputs(t, batch, obj)
            return jax.grad(lambda s: distill_sums(s, t, out, batch, cfg, obj)[0])(s)

        mem = jax.jit(grads).lower(params, params).compile().memory_analysis()
        print(f"distillation, distill.chunk={chunk}: "
              f"{mem.temp_size_in_bytes / 2**20:.0f} MiB of temporaries")


if __name__ == "__main__":
    main()
