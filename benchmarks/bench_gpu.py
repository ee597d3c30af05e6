"""Speed and memory on one accelerator: the GPU items of issue 17, and the same shapes through
`transformers` on the same machine for comparison. Prints figures; asserts nothing.

    python benchmarks/bench_gpu.py [--parts train,decode,lora7b,hf_train,hf_decode,hf_compile]
        [--out DIR] [--smoke]

Random weights with the real shapes (model files do not travel to a lent GPU machine):
- `train`: SmolLM2-135M's shape, batch 32 x 512 tokens, bf16 compute with fp32 master weights,
  AdamW, one jitted step (forward, backward, update); full fine-tuning and LoRA (rank 8, all seven
  targets), remat none and block, attention auto (cuDNN flash) and xla. Median of --steps steps
  after a compiling warm-up step.
- `decode`: batch-1 greedy generation of SmolLM2's shape (16-token prompt, --new-tokens tokens,
  EOS ignored), params and compute in bf16 and in fp32; ms per generated token.
- `lora7b`: LLaMA-2-7B's shape (hidden 4096, 32 layers, FFN 11008, vocab 32000), frozen weights
  bf16, LoRA rank 8 fp32, bf16 compute, remat=block, batch 8 x 2048 tokens: does one step fit one
  GPU, its peak device memory, tokens/s.
- `hf_train`, `hf_compile`, `hf_decode`: transformers' LlamaForCausalLM with SmolLM2's shape on
  the same device: the same full fine-tuning step (fp32 weights, bf16 autocast, fused AdamW,
  SDPA attention), eager and under torch.compile; and `generate` (bf16, greedy, batch 1).

MFU counts model FLOPs only (PaLM's convention, no recompute): per token 6N + 12·L·T·d for full
fine-tuning and 4N + 12·L·T·d for LoRA (the frozen weights need no weight gradient), N the
matmul parameters (blocks and head), d = heads x head_dim; against the H200/H100 datasheet dense
bf16 rate, 989 TFLOP/s, unless --peak-tflops says otherwise.

Each part runs in its own process (its own device-memory peak, its own compile caches) under
--part-timeout seconds; a part that fails or times out is reported and the others still run.
`--smoke` shrinks every shape so the whole script runs on a CPU in a minute or two (a check of
the code paths, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PARTS = ("train", "decode", "lora7b", "hf_train", "hf_decode", "hf_compile", "hf_lora")


def _shapes(smoke: bool) -> dict:
    smol = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                num_heads=9, num_kv_heads=3, tie_embeddings=True, rope_theta=100000.0,
                max_position_embeddings=8192)
    llama7b = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                   num_heads=32, num_kv_heads=32, tie_embeddings=False, rope_theta=10000.0,
                   max_position_embeddings=4096)
    if smoke:
        smol.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2)
        llama7b.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=4)
    return {"smol": smol, "llama7b": llama7b,
            "train_bt": (2, 32) if smoke else (32, 512),
            "lora7b_bt": (2, 32) if smoke else (8, 2048)}


def _matmul_params(c: dict) -> int:
    d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_layers"], c["vocab_size"]
    hd = d // c["num_heads"]
    q, kv = c["num_heads"] * hd, c["num_kv_heads"] * hd
    return L * (d * q + 2 * d * kv + q * d + 3 * d * f) + d * V   # the head is a matmul


def _flops_per_token(c: dict, T: int, full: bool) -> float:
    attn = 12 * c["num_layers"] * T * c["num_heads"] * (c["hidden_size"] // c["num_heads"])
    return (6 if full else 4) * _matmul_params(c) + attn


def _device_info() -> dict:
    import jax
    d = jax.devices()[0]
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device": d.device_kind}


def _peak_bytes():
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _batch(vocab, B, T, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, vocab, (1, B, T), dtype=np.int32),
            "loss_mask": np.ones((1, B, T), np.float32),
            "segment_ids": np.ones((1, B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy()}


def _time_train(cfg, params, method, B, T, steps, rank=8, dropout=0.0, segments=True,
                trace=None):
    """Compile, one warm-up step, then the median of `steps` steps: a dict of figures."""
    import jax
    import optax

    from alpaca_jax.peft import add_lora, is_adapter
    from alpaca_jax.train.split import split, train_all
    from alpaca_jax.train.step import make_train_step

    pred = train_all
    if method != "full":
        params = add_lora(params, cfg, jax.random.PRNGKey(1), rank=rank, alpha=16.0,
                          dropout=dropout, method=method)
        pred = is_adapter
    batch = _batch(cfg.vocab_size, B, T)
    if not segments:    # one unpacked example per row: causal attention, no segment mask
        del batch["segment_ids"]
    trainable, frozen = split(params, pred)
    trainable = jax.tree_util.tree_map(lambda x: x.copy(), trainable)
    opt = optax.adamw(1e-5)
    state = opt.init(trainable)
    step = make_train_step(cfg, opt)
    t = time.perf_counter()
    step = step.lower(trainable, frozen, state, batch, 0).compile()   # compiled once, reused
    mem = step.memory_analysis()
    trainable, state, m = step(trainable, frozen, state, batch, 0)
    loss0 = float(m["loss"])
    compile_s = time.perf_counter() - t
    times = []
    for i in range(steps):
        t = time.perf_counter()
        trainable, state, m = step(trainable, frozen, state, batch, i + 1)
        float(m["loss"])
        times.append(time.perf_counter() - t)
    if trace:
        import jax.profiler
        with jax.profiler.trace(trace, create_perfetto_trace=True):
            for i in range(3):
                trainable, state, m = step(trainable, frozen, state, batch, steps + i + 1)
                float(m["loss"])
    sec = statistics.median(times)
    return {"step_s": sec, "step_s_min": min(times), "tokens_s": B * T / sec,
            "compile_s": compile_s, "loss_first": loss0, "loss_last": float(m["loss"]),
            "xla_temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2**30}


def part_train(args, S):
    import jax
    import jax.numpy as jnp

    from alpaca_jax import ModelConfig, init_params
    c, (B, T) = S["smol"], S["train_bt"]
    base = ModelConfig(**c, compute_dtype="bfloat16")
    params = init_params(base, jax.random.PRNGKey(0), dtype=jnp.float32)
    rows = []
    # (method, remat, attention, adapter dropout, packed-segment mask)
    variants = [("full", "none", "auto", 0.0, True), ("lora", "none", "auto", 0.0, True),
                ("full", "block", "auto", 0.0, True), ("lora", "block", "auto", 0.0, True),
                ("full", "none", "xla", 0.0, True), ("full", "none", "auto", 0.0, False),
                ("full", "block", "auto", 0.0, False), ("lora", "block", "auto", 0.05, True)]
    if args.variants:   # a subset, by index into the list above
        variants = [variants[int(i)] for i in args.variants.split(",")]
    trace = os.environ.get("BENCH_TRACE")
    for k, (method, remat, attn, dropout, segments) in enumerate(variants):
        cfg = base.replace(remat=remat, attention=attn)
        try:
            r = _time_train(cfg, params, method, B, T, args.steps, dropout=dropout,
                            segments=segments, trace=trace if k == 0 else None)
        except Exception as e:  # noqa: BLE001 - report and go on to the next variant
            r = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        flops = _flops_per_token(c, T, method == "full")
        if "tokens_s" in r:
            r["tflops"] = r["tokens_s"] * flops / 1e12
            r["mfu"] = r["tflops"] / args.peak_tflops
        rows.append({"method": method, "remat": remat, "attention": attn, "dropout": dropout,
                     "segments": segments, "batch": [B, T],
                     "flops_per_token": flops, **r})
        print("ROW " + json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "peak_device_gib": (_peak_bytes() or 0) / 2**30}


def part_decode(args, S):
    import jax
    import jax.numpy as jnp

    from alpaca_jax import ModelConfig, generate_ids, init_params
    c = S["smol"]
    n_new = 16 if args.smoke else args.new_tokens
    prompt = [list(range(1, 17))]
    rows = []
    for dtype in ("bfloat16", "float32"):
        cfg = ModelConfig(**c, compute_dtype=dtype)
        params = init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.dtype(dtype))
        t = time.perf_counter()
        out = generate_ids(params, cfg, prompt, n_new, eos_ids=())
        compile_s = time.perf_counter() - t
        assert len(out[0]) == n_new, len(out[0])
        times = []
        for _ in range(args.decode_repeats):
            t = time.perf_counter()
            generate_ids(params, cfg, prompt, n_new, eos_ids=())
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        rows.append({"dtype": dtype, "new_tokens": n_new, "run_s": sec,
                     "ms_per_token": 1e3 * sec / n_new, "compile_s": compile_s})
        print("ROW " + json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def part_lora7b(args, S):
    import jax
    import jax.numpy as jnp

    from alpaca_jax import ModelConfig, count_params, init_params
    c, (B, T) = S["llama7b"], S["lora7b_bt"]
    cfg = ModelConfig(**c, compute_dtype="bfloat16", remat="block")
    t = time.perf_counter()
    params = jax.block_until_ready(init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16))
    init_s = time.perf_counter() - t
    after_init = _peak_bytes()
    r = _time_train(cfg, params, "lora", B, T, args.steps_7b)
    flops = _flops_per_token(c, T, full=False)
    r["tflops"] = r["tokens_s"] * flops / 1e12
    r["mfu"] = r["tflops"] / args.peak_tflops
    return {"params": count_params(params), "batch": [B, T], "init_s": init_s,
            "weights_gib": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 2**30,
            "peak_after_init_gib": (after_init or 0) / 2**30,
            "peak_device_gib": (_peak_bytes() or 0) / 2**30, "flops_per_token": flops, **r}


def _hf_model(c, dtype):
    import torch
    import transformers
    hd = c["hidden_size"] // c["num_heads"]
    conf = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], head_dim=hd,
        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
        tie_word_embeddings=c["tie_embeddings"], rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_position_embeddings"], attn_implementation="sdpa")
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return transformers.LlamaForCausalLM(conf).to(device=dev, dtype=dtype), dev


def _hf_train(args, S, compiled, lora=False):
    import torch
    c, (B, T) = S["smol"], S["train_bt"]
    model, dev = _hf_model(c, torch.float32)
    if lora:    # the Shortened LLaMA recipe through peft: rank 8, alpha 16, dropout 0.05
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=dev == "cuda")
    fwd = torch.compile(model) if compiled else model
    ids = torch.randint(0, c["vocab_size"], (B, T), device=dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t = time.perf_counter()
    for _ in range(2):
        step()
    sync()
    warm_s = time.perf_counter() - t
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        float(step())
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    flops = _flops_per_token(c, T, not lora)
    return {"torch": torch.__version__, "compiled": compiled, "lora": lora, "batch": [B, T],
            "step_s": sec,
            "tokens_s": B * T / sec, "warmup_s": warm_s,
            "tflops": B * T / sec * flops / 1e12,
            "mfu": B * T / sec * flops / 1e12 / args.peak_tflops,
            "peak_device_gib": (torch.cuda.max_memory_allocated() / 2**30
                                if dev == "cuda" else None)}


def part_hf_train(args, S):
    return _hf_train(args, S, compiled=False)


def part_hf_lora(args, S):
    return _hf_train(args, S, compiled=False, lora=True)


def part_hf_compile(args, S):
    return _hf_train(args, S, compiled=True)


def part_hf_decode(args, S):
    import torch
    import transformers
    c = S["smol"]
    n_new = 16 if args.smoke else args.new_tokens
    model, dev = _hf_model(c, torch.bfloat16)
    model.eval()
    prompt = torch.arange(1, 17, device=dev)[None]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def gen():
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new,
                                 do_sample=False, pad_token_id=0)
        sync()
        assert out.shape[1] == 16 + n_new

    gen()
    times = []
    for _ in range(args.decode_repeats):
        t = time.perf_counter()
        gen()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": "bfloat16", "new_tokens": n_new, "run_s": sec,
            "ms_per_token": 1e3 * sec / n_new}


def child(args):
    S = _shapes(args.smoke)
    info = {}
    if not args.part.startswith("hf_"):
        info = _device_info()
    r = globals()[f"part_{args.part}"](args, S)
    print("RESULT " + json.dumps({**info, **r}), flush=True)


def _fmt_train(rows):
    out = [f"{'method':6s} {'remat':6s} {'attn':5s} {'drop':4s} {'seg':3s} {'step ms':>8s} {'tok/s':>9s} "
           f"{'TFLOP/s':>8s} {'MFU':>6s} {'XLA temp GiB':>12s} {'compile s':>9s}"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['method']:6s} {r['remat']:6s} {r['attention']:5s} {r['error']}")
            continue
        out.append(f"{r['method']:6s} {r['remat']:6s} {r['attention']:5s} "
                   f"{r.get('dropout', 0):4.2f} {'yes' if r.get('segments', True) else 'no':3s} "
                   f"{1e3 * r['step_s']:8.1f} {r['tokens_s']:9,.0f} {r['tflops']:8.1f} "
                   f"{100 * r['mfu']:5.1f}% {r['xla_temp_gib']:12.2f} {r['compile_s']:9.1f}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--out", default=None, help="folder for bench_gpu.json and the logs")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--steps-7b", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--part-timeout", type=float, default=300.0)
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole run: later parts get what is left, or are skipped")
    ap.add_argument("--variants", default="", help="train: indices of the variants to run")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return child(args)

    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {list(PARTS)}")
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - a copy without .git
        sha = "unknown"
    results = {"commit": sha, "smoke": args.smoke, "peak_tflops": args.peak_tflops}
    print(f"bench_gpu commit={sha} parts={parts}", flush=True)
    start = time.perf_counter()
    for part in parts:
        cmd = [sys.executable, __file__, "--part", part, "--steps", str(args.steps),
               "--steps-7b", str(args.steps_7b), "--new-tokens", str(args.new_tokens),
               "--decode-repeats", str(args.decode_repeats),
               "--peak-tflops", str(args.peak_tflops), "--variants", args.variants] + (
                   ["--smoke"] if args.smoke else [])
        timeout = args.part_timeout
        if args.deadline is not None:
            timeout = min(timeout, args.deadline - (time.perf_counter() - start))
            if timeout < 20:
                results[part] = {"failed": "skipped: no time left before --deadline"}
                print(f"--- {part}: skipped (deadline)", flush=True)
                continue
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            stdout, stderr, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc = "timeout"
        wall = time.perf_counter() - t
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{part}.log"), "w") as f:
                f.write(stdout + "\n--- stderr ---\n" + stderr)
        line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        if line:
            results[part] = {**json.loads(line[-1][7:]), "wall_s": wall}
        else:
            rows = [json.loads(x[4:]) for x in stdout.splitlines() if x.startswith("ROW ")]
            results[part] = {"failed": str(rc), "wall_s": wall, "rows": rows,
                             "stderr_tail": stderr[-1500:]}
        print(f"--- {part}: {wall:.0f} s, rc={rc}", flush=True)
        if "failed" in results[part]:
            print(results[part]["stderr_tail"], flush=True)
        if args.out:
            with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
                json.dump(results, f, indent=1)

    print(json.dumps(results, indent=1))
    if "train" in results and results["train"].get("rows"):
        tr = results["train"]
        B, T = _shapes(args.smoke)["train_bt"]
        print(f"\nSmolLM2 shape, B{B} x T{T} bf16 train step on {tr.get('device', '?')} "
              f"(jax {tr.get('jax', '?')}):")
        print(_fmt_train(tr["rows"]))
    for p in ("hf_train", "hf_compile", "hf_lora"):
        r = results.get(p, {})
        if "tokens_s" in r:
            print(f"{p}: {r['tokens_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
                  f"step {1e3 * r['step_s']:.1f} ms, warm-up {r['warmup_s']:.0f} s")
    for p in ("decode", "hf_decode"):
        r = results.get(p, {})
        for row in r.get("rows", [r] if "ms_per_token" in r else []):
            if "ms_per_token" in row:
                print(f"{p} {row['dtype']}: {row['ms_per_token']:.2f} ms/token "
                      f"({row['new_tokens']} tokens)")
    r = results.get("lora7b", {})
    if "tokens_s" in r:
        print(f"lora7b: {r['params'] / 1e9:.2f}B params, batch {r['batch']}, peak device "
              f"{r['peak_device_gib']:.1f} GiB (weights {r['weights_gib']:.1f}), "
              f"{r['tokens_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, compile {r['compile_s']:.0f} s")


if __name__ == "__main__":
    main()
