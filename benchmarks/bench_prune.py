"""PPL block scoring: the project's scorer against naive loops, in one run. Prints figures and
the largest disagreement between methods; asserts nothing.

    python benchmarks/bench_prune.py [--model smollm2-135m-instruct] [--samples 10] [--seq-len 128]

Methods, all scoring every "remove block i" candidate on the same calibration ids
(default: the paper's 10 windows of 128 tokens from the c4 text):
  ours      `block_scores(..., "ppl")`: one pass records the residual stream entering every
            block, candidate i runs blocks i+1.. from it; one compiled function for all.
  masked    forward with `layer_mask` per candidate: one compilation, all L blocks every time.
  naive     the authors' loop ported: per candidate, build the (L-1)-block model with
            `drop_layers` and jit a fresh loss function for it. (JAX's compile cache still hits:
            every (L-1)-block model has the same shapes, so this compiles once.)
  torch     the authors' loop itself (Shortened LLaMA's anal_block_sensitivity_ppl.py): per
            candidate deep-copy the transformers model, delete the block, run each calibration
            row at batch 1; fp32 on the same CPU threads.
Each JAX method runs cold (compile caches cleared: compilation counts) and then warm.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--methods", default="ours,masked,naive,torch")
    ap.add_argument("--random-init", action="store_true",
                    help="SmolLM2-135M's shapes with random weights and ids (no model files)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from alpaca_jax import forward, init_params, load_model
    from alpaca_jax.prune import block_scores, calibration_ids, drop_layers

    if args.random_init:
        from alpaca_jax.config import ModelConfig
        cfg = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_layers=30, num_heads=9, num_kv_heads=3, tie_embeddings=True,
                          rope_theta=100000.0)
        params = init_params(cfg, jax.random.PRNGKey(0))
        tok = None
        calib = np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                  (args.samples, args.seq_len)).astype(np.int32)
    else:
        params, cfg, tok = load_model(args.model)
        calib = calibration_ids(args.calib, tok, cfg.vocab_size, n=args.samples,
                                seq_len=args.seq_len)
    L, toks = cfg.num_layers, jnp.asarray(calib)
    print(f"model {args.model}{' (random init)' if args.random_init else ''}: {L} blocks; "
          f"calibration {calib.shape[0]} x {calib.shape[1]} tokens; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, {os.cpu_count()} cpus ({platform.processor() or '?'})",
          flush=True)

    def nll(p, c, mask=None):
        logits, _ = forward(p, toks, c, layer_mask=mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))

    def ours():
        return block_scores(params, cfg, calib, "ppl")

    def masked():
        fn = jax.jit(lambda p, m: nll(p, cfg, m))
        return np.array([np.exp(float(fn(params, np.arange(L) != i))) for i in range(L)])

    def naive():
        out = []
        for i in range(L):
            p, c = drop_layers(params, cfg, [i])
            out.append(np.exp(float(jax.jit(nll, static_argnums=1)(p, c))))
        return np.array(out)

    def torch_loop():
        import copy
        import tempfile

        import torch
        import transformers

        from alpaca_jax import save_hf

        torch.set_num_threads(os.cpu_count())
        with tempfile.TemporaryDirectory() as d:
            save_hf(params, cfg, tok, d)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                d, torch_dtype=torch.float32).eval()
        x_all = torch.as_tensor(calib).long()
        loss_fct = torch.nn.CrossEntropyLoss(reduction="none")
        t = time.perf_counter()
        out = []
        for i in range(L):
            m = copy.deepcopy(model)
            del m.model.layers[i]
            m.config.num_hidden_layers -= 1
            nlls = []
            with torch.no_grad():
                for j in range(x_all.shape[0]):
                    x = x_all[j:j + 1]
                    logits = m(x, use_cache=False).logits
                    nlls.append(loss_fct(logits[0, :-1], x[0, 1:]))
            out.append(float(np.exp(torch.cat(nlls).mean().item())))
        return np.array(out), time.perf_counter() - t

    runs = {"ours": ours, "masked": masked, "naive": naive}
    times, scores = {}, {}
    for name in args.methods.split(","):
        if name == "torch":
            if tok is None:
                print("torch: skipped with --random-init (it needs the model's files)")
                continue
            scores[name], times[name] = torch_loop()
            print(f"{name:8s} {times[name]:8.2f} s ({times[name] / L:.3f} s per candidate; the "
                  f"model load is not counted)", flush=True)
            continue
        jax.clear_caches()   # cold: compilation is part of the cost
        for tag in ("cold", "warm"):
            t = time.perf_counter()
            scores[name] = runs[name]()
            times[name if tag == "warm" else f"{name} cold"] = dt = time.perf_counter() - t
            print(f"{name:8s} {dt:8.2f} s {tag} ({dt / L:.3f} s per candidate)", flush=True)
    ref = scores.get("ours")
    if ref is not None:
        for name, t in times.items():
            if not name.startswith("ours"):
                base = times["ours cold" if name.endswith("cold") else "ours"]
                dev = np.max(np.abs(scores[name.split()[0]] / ref - 1))
                print(f"{name:11s} / ours: {t / base:5.2f}x the time; scores agree to "
                      f"{dev:.1e} relative")
        print("lowest-ppl blocks (removed first):",
              [int(i) for i in np.argsort(ref, kind="stable")[:8]])


if __name__ == "__main__":
    main()
