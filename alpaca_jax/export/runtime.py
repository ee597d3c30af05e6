"""The CPU int8 runtime (llama.cpp through `llama-cpp-python`): speed, memory and the physical
limit a GGUF file runs against.

`bench_gguf` times a file in a fresh child process per setting, so the peak RSS it reports
(`os.wait4`) is that of one process loading one model, as on a device, and earlier runs cannot
inflate it. `bytes_per_token` / `copy_bandwidth` give the memory-bandwidth bound: a decode step
reads every weight once (the embedding table only when it is also the output head), so
tokens/s <= bandwidth / bytes read per token.

`open_llama(..., repack=False)` loads a file without ggml's runtime weight repacking (the CPU
"extra buffer types": Q4_0 and others re-laid into interleaved tiles on x86 AVX2 and ARM, with
their own activation quantization and accumulation order). Parity checks read the file through
the standard ggml dot products, which our activation emulation reproduces exactly; whether ggml
repacks depends on the CPU it runs on, so a parity figure taken with it would depend on the
machine, not the file. Benchmarks keep llama.cpp's default (repacking on), as users run it.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def _without_repack():
    """`llama_cpp.Llama` reads its model parameters from `llama_model_default_params()` at
    construction and has no argument for `use_extra_bufts`, so patch the default meanwhile."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def no_repack():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = no_repack
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def open_llama(path, *, repack: bool = True, **kwargs):
    """`llama_cpp.Llama` on `path` (quiet); `repack=False`: ggml's standard CPU kernels only."""
    import llama_cpp

    kwargs.setdefault("verbose", False)
    if repack:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    with _without_repack():
        return llama_cpp.Llama(model_path=str(path), **kwargs)


def _child(path: str, threads: int, prompt: list[int], n_gen: int, repeats: int) -> dict:
    """Runs in the child: load, warm up, then `repeats` x (prompt pass, n_gen greedy steps)."""
    import llama_cpp

    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n_gen + 8, n_batch=len(prompt),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def greedy():      # the last position's logits (llama.cpp keeps only those by default)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    prompt_s, gen_s = [], []
    for r in range(repeats + 1):          # the first round warms caches and is discarded
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        t_prompt = time.perf_counter() - t
        nxt = greedy()
        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([nxt])
            nxt = greedy()
        t_gen = time.perf_counter() - t
        if r:
            prompt_s.append(t_prompt)
            gen_s.append(t_gen)
    return {"load_s": load_s, "prompt_s": prompt_s, "gen_s": gen_s}


def bench_gguf(path, threads: int, prompt: list[int], n_gen: int = 64, repeats: int = 5) -> dict:
    """Prompt and generation tokens/s (medians of `repeats` after one warm-up) and peak RSS of a
    child process running `path` in llama.cpp with `threads` threads. Greedy decoding, batch 1,
    llama.cpp's default F16 KV cache."""
    if not prompt:
        raise ValueError("bench_gguf needs a non-empty prompt")
    args = json.dumps({"path": str(path), "threads": threads, "prompt": [int(t) for t in prompt],
                       "n_gen": n_gen, "repeats": repeats})
    # run as a script, not `-m`: importing the package would put JAX in the child's footprint
    proc = subprocess.Popen([sys.executable, __file__, args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()      # the child reports its own peak RSS (see __main__)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp benchmark of {path} failed (exit {proc.returncode}):\n"
                           f"{err[-2000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    p, g = statistics.median(r["prompt_s"]), statistics.median(r["gen_s"])
    return {"threads": threads, "prompt_tokens": len(prompt), "gen_tokens": n_gen,
            "repeats": repeats, "prompt_tok_s": len(prompt) / p, "gen_tok_s": n_gen / g,
            "load_s": r["load_s"], "peak_rss_mb": r["peak_rss_kb"] / 1024,
            "baseline_rss_mb": r["baseline_rss_kb"] / 1024}


def llama_logits(path, ids: list[int], threads: int = 2) -> np.ndarray:
    """`[T, V]` float32 logits of one pass over `ids` in llama.cpp, with an F32 KV cache so that
    the cache adds no rounding of its own, and without runtime repacking (parity checks)."""
    llm = open_llama(path, repack=False, n_ctx=len(ids), n_batch=len(ids), logits_all=True,
                     n_threads=threads, type_k=0, type_v=0)
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], np.float32)


def llama_greedy(path, prompt: list[int], max_new_tokens: int, eos_ids=(),
                 threads: int = 2) -> list[int]:
    """Greedy continuation of `prompt` in llama.cpp (F32 KV cache, no runtime repacking), cut
    before the first EOS."""
    llm = open_llama(path, repack=False, n_ctx=len(prompt) + max_new_tokens,
                     n_batch=len(prompt), n_threads=threads, type_k=0, type_v=0)
    n_vocab, out = llm.n_vocab(), []
    llm.eval(list(prompt))
    for _ in range(max_new_tokens):
        t = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
        if t in eos_ids:
            break
        out.append(t)
        llm.eval([t])
    return out


def kl_stats(p_logits: np.ndarray, q_logits: np.ndarray) -> dict:
    """KL(p || q) per position (float64) summarised: mean, p99, max; and argmax agreement."""
    p = p_logits.astype(np.float64)
    q = q_logits.astype(np.float64)
    p = p - np.logaddexp.reduce(p, -1, keepdims=True)
    q = q - np.logaddexp.reduce(q, -1, keepdims=True)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()),
            "argmax_agreement": float((p.argmax(-1) == q.argmax(-1)).mean())}


def bytes_per_token(path, context: int = 0) -> dict:
    """Bytes a decode step reads from `path`: every tensor except the token embedding table,
    which is read whole only when it is also the output head (one row otherwise), plus the F16
    KV cache of `context` earlier tokens."""
    import gguf

    r = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    tied = "output.weight" not in sizes
    weights = sum(n for k, n in sizes.items() if k != "token_embd.weight" or tied)
    fields = {k: f.contents() for k, f in r.fields.items()
              if k.startswith("llama.") and not k.startswith("llama.vocab")}
    heads_kv = fields.get("llama.attention.head_count_kv", fields["llama.attention.head_count"])
    head_dim = fields["llama.embedding_length"] // fields["llama.attention.head_count"]
    kv = 2 * fields["llama.block_count"] * context * heads_kv * head_dim * 2
    return {"file_bytes": Path(path).stat().st_size, "weight_bytes": weights, "kv_bytes": kv,
            "bytes_per_token": weights + kv, "tied_head": tied}


def copy_bandwidth(threads: int = 1, mb: int = 256, repeats: int = 7) -> float:
    """Measured memory bandwidth in bytes/s: a large array copy (bytes read + bytes written per
    second), split over `threads` threads (numpy releases the GIL while copying). The best of
    `repeats`: a bound is the most the machine did, and slower repeats are interference."""
    n = mb * 2**20 // 8
    src, dst = np.ones(n), np.empty(n)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def one():
        ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    one()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / min(times)


def _peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss, which Linux carries
    over from the parent across fork+exec and would report the (JAX-sized) parent."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


if __name__ == "__main__":      # the child of bench_gguf
    a = json.loads(sys.argv[1])
    import llama_cpp  # noqa: F401  (the library's own footprint belongs to the baseline)

    base = _peak_rss_kb()
    res = _child(a["path"], a["threads"], a["prompt"], a["n_gen"], a["repeats"])
    res.update(peak_rss_kb=_peak_rss_kb(), baseline_rss_kb=base)
    print(json.dumps(res))
