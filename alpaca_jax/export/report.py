"""Checking and timing exported GGUF files: parity of each file against the JAX model (KL per
position over wiki tokens, argmax agreement, perplexity on both sides; the reference for
Q8_0/Q4_0 is the JAX fake-quant model with llama.cpp's activation rounding, for F16/F32 the float
model), greedy answers in llama.cpp and in JAX, and llama.cpp's prompt and generation tokens/s
and peak RSS beside the memory-bandwidth bound. The `export` and `benchmark` stages
(`alpaca_jax.recipe.stages`) call these."""
from __future__ import annotations

import statistics
import time
from pathlib import Path


def _reference(params, qtype: str, cfg):
    """(params, transform) of the JAX model a llama.cpp file of `qtype` should reproduce: the
    float model for F32/F16, else the weights rounded once (`ptq`: the file's values) under a
    transform that rounds the matmul inputs as llama.cpp's CPU path does for each weight's
    type. The same model as `FakeQuant(activations=True)` on the float weights, without
    re-running the quantizer at every forward and decode step."""
    import dataclasses

    from alpaca_jax.quant import FakeQuant, QuantSpec, ptq

    if qtype in ("F32", "F16"):
        return params, None
    spec = QuantSpec(qtype.lower(), activations=True)
    fq = FakeQuant.from_spec(spec, cfg)
    return ptq(params, spec, cfg), dataclasses.replace(fq, weights=False)


def _qat_grid(recipe: dict, qtype: str, cfg) -> bool | None:
    """For a QAT run: does the file's quantization plan equal the grid it was trained on?"""
    from alpaca_jax.export.gguf_out import _tensor_plan

    quant = recipe.get("quant")
    if not quant or quant.get("method") != "qat":
        return None

    def norm(v):   # a format, or one per layer (a tuple; a list once read back from JSON)
        return v.upper() if isinstance(v, str) else tuple(x.upper() for x in v)
    trained = {k: norm(v) for k, v in (quant.get("tensors") or {}).items()}
    plan = {k: v for k, v in _tensor_plan(cfg, qtype).items() if v not in ("F16", "F32")}
    return plan == trained


def jax_generation_tok_s(params, cfg, prompt, n_gen, repeats) -> float:
    """Greedy decode tokens/s of the JAX fp32 model, batch 1: (n_gen - 1) steps over the time
    difference of n_gen and 1 new tokens, so prefill is not counted (as llama.cpp's figure)."""
    from alpaca_jax import generate_ids

    def timed(n):
        generate_ids(params, cfg, [prompt], n, eos_ids=())       # compile and warm up
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            generate_ids(params, cfg, [prompt], n, eos_ids=())
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    return (n_gen - 1) / max(timed(n_gen) - timed(1), 1e-9)


def wiki_ids(tok, n: int) -> list[int]:
    """The first `n` tokens of the wiki corpus (parity windows, benchmark prompts)."""
    from alpaca_jax.data.corpora import load_documents

    if n == 0:
        return []
    ids = tok.encode("\n\n".join(load_documents("wiki")[:60]), bos=False, parse_special=False)
    if len(ids) < n:
        raise ValueError(f"the wiki corpus has {len(ids)} tokens; {n} were asked for")
    return ids[:n]


def export_files(params, cfg, tok, qtypes, out_dir: Path, e, recipe: dict, name: str,
                 float_model=None):
    """Write one GGUF per qtype into `out_dir` and check each against the JAX model (KL over
    `e.parity_tokens` wiki tokens, greedy answers to `e.prompts`). Returns {qtype: entry};
    `params` must be merged. `float_model`: `(params, cfg)` of the model the "KL vs float"
    figure compares to (`e.float_reference`), default `params` unquantized."""
    import numpy as np

    from alpaca_jax import forward, generate_ids
    from alpaca_jax.eval.perplexity import perplexity_of_logits
    from alpaca_jax.export import to_gguf
    from alpaca_jax.export.runtime import bytes_per_token, kl_stats, llama_greedy, llama_logits

    parity_ids = wiki_ids(tok, e.parity_tokens)
    chats = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
             for p in e.prompts]
    eos = tuple(cfg.eos_token_ids)
    exports = {}
    float_logits = None   # the unquantized JAX model: what each file's rounding costs
    if parity_ids:
        f_params, f_cfg = float_model or (params, cfg)
        f_cfg = f_cfg.replace(compute_dtype=cfg.compute_dtype, attention=cfg.attention)
        float_logits = np.asarray(forward(f_params, np.array([parity_ids]), f_cfg)[0][0])
    for qtype in qtypes:
        path = to_gguf(params, cfg, tok, out_dir / f"model-{qtype.lower()}.gguf", qtype,
                       name=name)
        info = bytes_per_token(path, context=e.prompt_tokens + e.gen_tokens // 2)
        entry = {"file": path.name, **info, "qat_grid": _qat_grid(recipe, qtype, cfg)}
        ref_params, ref = _reference(params, qtype, cfg)
        kw = {} if ref is None else {"materialize": ref}
        if parity_ids:
            theirs = llama_logits(path, parity_ids)
            ours = np.asarray(forward(ref_params, np.array([parity_ids]), cfg, **kw)[0][0])
            entry["parity"] = {**kl_stats(theirs, ours), "tokens": len(parity_ids),
                               "reference": "float" if ref is None else "fake-quant, activations",
                               "ppl_llama_cpp": perplexity_of_logits(theirs, parity_ids),
                               "ppl_jax": perplexity_of_logits(ours, parity_ids),
                               "kl_float": kl_stats(theirs, float_logits)["kl_mean"],
                               "float_reference": e.float_reference or "this model, float"}
        if chats:
            jax_out = generate_ids(ref_params, cfg, chats, e.max_new_tokens, eos_ids=eos, **kw)
            answers = []
            for prompt, ids_c, ours_c in zip(e.prompts, chats, jax_out):
                theirs_c = llama_greedy(path, ids_c, e.max_new_tokens, eos)
                same = next((i for i, (a, b) in enumerate(zip(ours_c, theirs_c)) if a != b),
                            min(len(ours_c), len(theirs_c)))
                a = {"prompt": prompt, "llama_cpp": tok.decode(theirs_c),
                     "jax": tok.decode(ours_c), "identical": ours_c == theirs_c,
                     "common_prefix_tokens": same}
                if same < min(len(ours_c), len(theirs_c)):
                    # how close the JAX model itself was to llama.cpp's choice where they part
                    last = np.asarray(forward(ref_params, np.array([ids_c + ours_c[:same]]),
                                              cfg, **kw)[0][0, -1])
                    a["jax_margin_at_divergence"] = float(last[ours_c[same]]
                                                          - last[theirs_c[same]])
                answers.append(a)
            entry["greedy"] = answers
        exports[qtype] = entry
        print(f"{qtype}: {_summary(entry)}", flush=True)
    return exports


def bench_files(exports: dict, out_dir: Path, e, tok) -> dict:
    """Time every exported file in llama.cpp at each of `e.threads` (adds `bench` to each
    entry) beside the measured copy bandwidth; returns the metrics."""
    from alpaca_jax.export.runtime import bench_gguf, copy_bandwidth

    prompt = wiki_ids(tok, e.prompt_tokens)
    bandwidth = {t: copy_bandwidth(t) for t in e.threads}
    metrics = {f"copy_gb_s_{t}t": b / 1e9 for t, b in bandwidth.items()}
    for qtype, entry in exports.items():
        entry["bench"] = []
        for t in e.threads:
            b = bench_gguf(out_dir / entry["file"], t, prompt, e.gen_tokens, e.repeats)
            b["bound_gen_tok_s"] = bandwidth[t] / entry["bytes_per_token"]
            entry["bench"].append(b)
            metrics.update({f"{qtype}/prompt_tok_s_{t}t": b["prompt_tok_s"],
                            f"{qtype}/gen_tok_s_{t}t": b["gen_tok_s"],
                            f"{qtype}/bound_gen_tok_s_{t}t": b["bound_gen_tok_s"],
                            f"{qtype}/peak_rss_mb_{t}t": b["peak_rss_mb"]})
    return metrics


def _summary(entry: dict) -> str:
    s = f"{entry['file']} {entry['file_bytes'] / 2**20:.1f} MiB"
    if "parity" in entry:
        p = entry["parity"]
        s += (f"; vs JAX ({p['reference']}): mean KL {p['kl_mean']:.2e}, argmax "
              f"{p['argmax_agreement']:.3f}, ppl {p['ppl_llama_cpp']:.3f} vs {p['ppl_jax']:.3f}")
        if "kl_float" in p:
            s += f"; KL to the float model {p['kl_float']:.2e}"
    if "greedy" in entry:
        s += (f"; greedy answers identical {sum(a['identical'] for a in entry['greedy'])}/"
              f"{len(entry['greedy'])}")
    return s


def table(results: dict) -> str:
    """The export's figures as a Markdown table (one row per qtype and thread count)."""
    m = results["metrics"]
    rows = ["| file | MiB | threads | prompt tok/s | gen tok/s | bound tok/s | of bound | "
            "peak RSS MiB | wiki ppl | KL vs float | mean KL vs JAX | greedy same |",
            "|" + "---|" * 12]
    for q, e in results["exports"].items():
        p = e.get("parity", {})
        kl = f"{p['kl_mean']:.2e}" if p else "-"
        kl = (f"{p['ppl_llama_cpp']:.2f} | {p['kl_float']:.2e} | " if "kl_float" in p
              else "- | - | ") + kl
        g = (f"{sum(a['identical'] for a in e['greedy'])}/{len(e['greedy'])}"
             if "greedy" in e else "-")
        for b in e.get("bench") or [None]:
            if b is None:
                rows.append(f"| {q} | {e['file_bytes'] / 2**20:.1f} | - | - | - | - | - | - | "
                            f"{kl} | {g} |")   # kl holds the three parity columns
                continue
            rows.append(f"| {q} | {e['file_bytes'] / 2**20:.1f} | {b['threads']} | "
                        f"{b['prompt_tok_s']:.0f} | {b['gen_tok_s']:.1f} | "
                        f"{b['bound_gen_tok_s']:.0f} | {b['gen_tok_s'] / b['bound_gen_tok_s']:.0%}"
                        f" | {b['peak_rss_mb']:.0f} | {kl} | {g} |")
    if "bench/jax_fp32/gen_tok_s" in m:
        rows.append(f"\nJAX fp32 (this process, all cores): {m['bench/jax_fp32/gen_tok_s']:.1f} "
                    f"generated tokens/s")
    return "\n".join(rows)
