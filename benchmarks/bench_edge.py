"""The edge benchmark: SmolLM2 and a 20%-pruned SmolLM2 as F16, Q8_0 and Q4_0 GGUFs in llama.cpp
on this CPU, beside the JAX fp32 model. Prints figures; asserts nothing.

    python benchmarks/bench_edge.py [--repeats 5] [--pruned-run RUN_DIR] [--out DIR]

    python benchmarks/bench_edge.py --merge OUT_DIR [OUT_DIR ...] [--plot PNG]

`--merge` runs nothing: it reads earlier `--out` directories and prints one compact table per
model (the edge table of RESULTS.md) with every file in them, a QAT-trained file labelled
"QAT", and draws the plot over all of them.

QAT rows: the models are the final models of QAT runs (`--base-run`, `--pruned-run`), exported
to the format they trained on (`--qtypes`), with the "KL vs float" column measured against the
float models of the PTQ table (`--base-float`, `--pruned-float`), not against the QAT runs' own
float weights.

Per model and file: size; peak RSS of a process that loads and runs it; prompt and generation
tokens/s at 1 and 2 threads (medians of --repeats after a warm-up; 128-token prompt, 64 greedy
tokens); the memory-bandwidth bound (measured copy bandwidth / bytes a decode step reads) and
the fraction of it reached; parity with the JAX model (mean KL over 256 wiki tokens, greedy
answers to five prompts identical); and the JAX fp32 model's greedy generation tokens/s.

The pruned model is SmolLM2 without the six blocks the PPL criterion removes at 20%
(3 5 12 13 14 17, RESULTS.md), unhealed (speed and memory do not depend on the weights' values),
or the final model of a prune run with --pruned-run. Each model goes through the export entry
point (`experiments/export.py`), so these are the figures that command writes to results.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PPL_20PCT = [3, 5, 12, 13, 14, 17]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pruned-run", default=None, help="a prune run dir (its healed model)")
    ap.add_argument("--base-run", default=None,
                    help="a run dir whose final model stands in for --model (a QAT run)")
    ap.add_argument("--base-float", default=None,
                    help="the float model of the unpruned rows' KL (default: the model itself)")
    ap.add_argument("--pruned-float", default=None,
                    help="the float model of the pruned rows' KL (default: the model itself)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="keep the GGUFs and results.json here")
    ap.add_argument("--qtypes", default="F16,Q8_0,Q4_0",
                    help="files to write and time: F16, any GGML format, Q4_K_M and the other "
                         "llama.cpp K-quant file types")
    ap.add_argument("--parity-tokens", type=int, default=256,
                    help="wiki tokens for the KL and perplexity of each file")
    ap.add_argument("--plot", default=None, help="write the size / perplexity / speed plot here")
    ap.add_argument("--merge", nargs="+", default=None, metavar="OUT_DIR",
                    help="run nothing: tabulate and plot earlier --out directories together")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.plot)

    from alpaca_jax.export.report import table
    from alpaca_jax.provenance import git_sha, machine
    from alpaca_jax.recipe import run
    from alpaca_jax.recipe.settings import ExportCfg, Job, LoggerConfig, ModelSourceCfg

    def ExportJob(**kw):      # the export preset (conf/export.yaml)
        return Job(stages=["export", "benchmark"], name="export",
                   logger=LoggerConfig(mode="disabled"), **kw)

    m = machine()
    print(f"commit={git_sha()} machine={m}")
    jobs = {"SmolLM2-135M-Instruct": (
                ExportJob(run_dir=args.base_run) if args.base_run else
                ExportJob(model=ModelSourceCfg(args.model))),
            "20%-pruned (24 blocks)": (
                ExportJob(run_dir=args.pruned_run) if args.pruned_run else
                ExportJob(model=ModelSourceCfg(args.model), drop_blocks=PPL_20PCT))}
    out_root = Path(args.out or tempfile.mkdtemp(prefix="bench_edge_"))
    results = {}
    floats = {"SmolLM2-135M-Instruct": args.base_float, "20%-pruned (24 blocks)": args.pruned_float}
    for name, job in jobs.items():
        job.export = ExportCfg(repeats=args.repeats, qtypes=args.qtypes.split(","),
                               parity_tokens=args.parity_tokens, float_reference=floats[name])
        d = out_root / name.split()[0].replace("%", "pct")
        d.mkdir(parents=True, exist_ok=True)
        print(f"\n## {name}", flush=True)
        results[name] = run(job, d, {"benchmark": "bench_edge", "model": name})
    print("\n# Summary")
    for name, res in results.items():
        mt = res["metrics"]
        print(f"\n## {name}: {mt['params'] / 1e6:.1f}M parameters; copy "
              f"bandwidth {mt['bench/copy_gb_s_1t']:.1f} GB/s (1 thread), "
              f"{mt['bench/copy_gb_s_2t']:.1f} "
              f"GB/s (2 threads)\n")
        print(table(res))
    if args.plot:
        from analysis.plots import edge_pareto
        edge_pareto(results, args.plot)
        print(f"plot: {args.plot}")
    print(f"\nfiles and results.json under {out_root}")


def merge(dirs, plot=None) -> dict:
    """{model: results with the exports of every directory} (keys "Q4_0", "Q4_0 QAT", ...),
    printed as compact tables; the plot over all of them with `plot`."""
    import json

    merged = {}
    for d in dirs:
        for sub in sorted(Path(d).iterdir()):
            f = sub / "results.json"
            if not f.is_file():
                continue
            res = json.loads(f.read_text())
            into = merged.setdefault(sub.name, {**res, "exports": {}, "from": []})
            into["from"].append(f"{f} (commit {res.get('git_sha', '?')[:7]})")
            for q, e in res.get("exports", {}).items():
                # qat_grid: None for a float model's file, True for a QAT model on the grid
                # it trained on, False for a QAT model exported to another type
                key = {None: q, True: f"{q} QAT"}.get(e.get("qat_grid"), f"{q} (of a QAT model)")
                if key in into["exports"]:
                    raise SystemExit(f"--merge: {sub.name} has {key} in more than one of {dirs}")
                into["exports"][key] = e
    for name, res in merged.items():
        print(f"\n## {name}: {res['metrics']['params'] / 1e6:.1f}M parameters; from "
              + ", ".join(res["from"]) + "\n")
        print(compact_table(res))
    if plot:
        from analysis.plots import edge_pareto
        edge_pareto(merged, plot)
        print(f"plot: {plot}")
    return merged


def compact_table(res: dict) -> str:
    """One row per file: size, llama.cpp wiki perplexity, KL to the float model, generation
    tokens/s at 1 and 2 threads, prompt tokens/s at 2 threads, peak RSS, KL to the JAX model
    the file should reproduce."""
    rows = ["| file | MiB | wiki ppl | KL vs float | gen tok/s 1t | gen tok/s 2t | "
            "prompt tok/s 2t | peak RSS MiB | KL vs JAX |", "|---|" + "---:|" * 8]
    for q, e in sorted(res["exports"].items(), key=lambda kv: -kv[1]["file_bytes"]):
        p, b = e.get("parity") or {}, {x["threads"]: x for x in e.get("bench") or []}
        cell = lambda t, k, f: f.format(b[t][k]) if t in b else "-"  # noqa: E731
        rows.append(
            f"| {q} | {e['file_bytes'] / 2**20:.1f} | "
            + (f"{p['ppl_llama_cpp']:.2f} | {p['kl_float']:.1e} | " if "kl_float" in p
               else "- | - | ")
            + f"{cell(1, 'gen_tok_s', '{:.1f}')} | {cell(2, 'gen_tok_s', '{:.1f}')} | "
            f"{cell(2, 'prompt_tok_s', '{:.0f}')} | "
            f"{max((x['peak_rss_mb'] for x in b.values()), default=0):.0f} | "
            + (f"{p['kl_mean']:.1e} |" if p else "- |"))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
