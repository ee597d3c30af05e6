"""Ablation plots as PNG: perplexity against parameters, zero-shot accuracy against llama.cpp
generation speed. One marker per run, labelled by its facets."""
from __future__ import annotations

from pathlib import Path


def _scatter(rows, x_key, y_key, label_keys, xlabel, ylabel, title, path, x_scale=1.0,
             y_scale=1.0) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r[x_key] * x_scale, r[y_key] * y_scale, " ".join(str(r.get(k)) for k in label_keys))
           for r in rows if isinstance(r.get(x_key), (int, float))
           and isinstance(r.get(y_key), (int, float))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for x, y, label in pts:
        ax.scatter([x], [y], s=28)
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def ppl_vs_params(rows, path, label_keys=("criterion", "heal", "quant")):
    return _scatter(rows, "params", "ppl_wiki", label_keys, "parameters (M)",
                    "wiki perplexity", "Perplexity vs parameters", path, x_scale=1e-6)


def accuracy_vs_speed(rows, path, label_keys=("criterion", "heal", "quant"), threads=1):
    """Zero-shot average against the llama.cpp generation tokens/s of the run's exported file
    (`benchmark` stage) at `threads` threads."""
    for r in rows:
        speeds = [v for k, v in r.items() if k.startswith("bench/") and
                  k.endswith(f"/gen_tok_s_{threads}t") and "jax" not in k]
        r[f"_gen_tok_s_{threads}t"] = speeds[0] if speeds else None
    return _scatter(rows, f"_gen_tok_s_{threads}t", "zeroshot_avg", label_keys,
                    f"llama.cpp generation tokens/s ({threads} thread{'s' * (threads > 1)})",
                    "zero-shot accuracy (avg, %)", "Accuracy vs speed", path, y_scale=100)


def pareto_front(points):
    """The points no other point beats on both axes (smaller x and smaller y are better),
    sorted by x."""
    front, best = [], float("inf")
    for x, y, *rest in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best:
            front.append((x, y, *rest))
            best = y
    return front


def edge_pareto(results: dict, path, threads=(1, 2)) -> Path | None:
    """File size against wiki perplexity of each exported GGUF (one panel per model), the
    Pareto front drawn, each point labelled with its llama.cpp generation tokens/s at
    `threads`. `results`: {model name: the export run's results (`exports` with `parity` and
    `bench`)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.0 * len(results), 4.6), dpi=120,
                             squeeze=False)
    drawn = False
    for ax, (model, res) in zip(axes[0], results.items()):
        pts = []
        for q, e in res.get("exports", {}).items():
            p = e.get("parity") or {}
            if "ppl_llama_cpp" not in p:
                continue
            speed = {b["threads"]: b["gen_tok_s"] for b in e.get("bench") or []}
            label = q + "".join(f"\n{speed[t]:.0f} tok/s @{t}t" for t in threads if t in speed)
            pts.append((e["file_bytes"] / 2**20, p["ppl_llama_cpp"], label))
        if not pts:
            continue
        drawn = True
        for i, (x, y, label) in enumerate(sorted(pts)):
            ax.scatter([x], [y], s=30)
            # neighbours by size alternate above and below their point, so labels do not overlap
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4 if i % 2 else -26),
                        textcoords="offset points")
        front = pareto_front(pts)
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", lw=1, alpha=0.6,
                label="Pareto front (size, perplexity)")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel("wiki perplexity (llama.cpp)")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, path)
