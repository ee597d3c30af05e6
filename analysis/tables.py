"""Ablation tables: rows grouped by facets (seeds pooled), each metric as mean ± std over the
group, in Markdown or LaTeX (booktabs); lm-eval task metrics with their standard error."""
from __future__ import annotations

import math
import statistics

# metric key -> (column title, format); keys are those of `collect.row_of`. A task metric's
# `<key>_stderr` (lm-eval's) is shown beside it when the runs have one.
_PCT = lambda v: f"{100 * v:.1f}"  # noqa: E731
METRICS = {
    "params": ("params (M)", lambda v: f"{v / 1e6:.1f}"),
    "ppl_wiki": ("wiki ppl", lambda v: f"{v:.2f}"),
    "ppl_tiny": ("tiny ppl", lambda v: f"{v:.2f}"),
    "val_loss": ("val loss", lambda v: f"{v:.4f}"),
    "piqa/acc": ("PIQA acc", _PCT),
    "piqa/acc_norm": ("PIQA acc_norm", _PCT),
    "arc_easy/acc": ("ARC-e acc", _PCT),
    "arc_easy/acc_norm": ("ARC-e acc_norm", _PCT),
    "boolq/acc": ("BoolQ", _PCT),
    "copa/acc": ("COPA", _PCT),
    "wsc273/acc": ("WSC273", _PCT),
    "winograd_wsc/acc": ("WSC (pre-lm-eval)", _PCT),   # runs before the harness (issue 16)
    "lambada_openai/acc": ("LAMBADA", _PCT),
    "hellaswag/acc_norm": ("HellaSwag acc_norm", _PCT),          # the paper suite (eval=paper)
    "winogrande/acc": ("WinoGrande", _PCT),
    "arc_challenge/acc_norm": ("ARC-c acc_norm", _PCT),
    "openbookqa/acc_norm": ("OBQA acc_norm", _PCT),
    "zeroshot_avg": ("0-shot avg", _PCT),
    "file_mb": ("GGUF MiB", lambda v: f"{v:.1f}"),
    "gen_tok_s_1t": ("llama.cpp tok/s 1t", lambda v: f"{v:.0f}"),
    "gen_tok_s_2t": ("llama.cpp tok/s 2t", lambda v: f"{v:.0f}"),
    "eval_time_s": ("eval time (s)", lambda v: f"{v:.0f}"),        # the evaluation stage's wall time
}
STDERR_NOTE = ("Task columns: ± lm-eval's standard error for one run; over several seeds, "
               "mean ± std over the seeds, the mean standard error in parentheses.")


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def group_rows(rows: list[dict], by: list[str]) -> list[tuple[tuple, list[dict]]]:
    """Rows grouped by the values of `by`, in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    return list(groups.items())


def summarize(rows: list[dict], by: list[str], metrics: list[str]) -> list[dict]:
    """One record per group: the `by` values, n, and per metric (mean, std or None, count)."""
    out = []
    for key, members in group_rows(rows, by):
        rec = {"key": dict(zip(by, key)), "n": len(members),
               "paths": [m["path"] for m in members], "stats": {}}
        for metric in metrics:
            vals = [m[metric] for m in members if _num(m.get(metric))]
            if not vals:
                rec["stats"][metric] = None
                continue
            std = statistics.stdev(vals) if len(vals) > 1 else None
            rec["stats"][metric] = (statistics.fmean(vals), std, len(vals))
            ses = [m[f"{metric}_stderr"] for m in members if _num(m.get(f"{metric}_stderr"))]
            if ses:
                rec.setdefault("stderr", {})[metric] = statistics.fmean(ses)
        out.append(rec)
    return out


def _cell(stat, fmt, pm: str, se=None) -> str:
    if stat is None:
        return "-"
    mean, std, _ = stat
    if std is None:
        return fmt(mean) if se is None else f"{fmt(mean)} {pm} {fmt(se)}"
    return f"{fmt(mean)} {pm} {fmt(std)}" + ("" if se is None else f" ({fmt(se)})")


def _has_stderr(summary, metrics) -> bool:
    return any(m in r.get("stderr", {}) for r in summary for m in metrics)


def _present(summary, metrics):
    """Metrics that have a value in at least one group (empty columns are left out)."""
    return [m for m in metrics if any(r["stats"].get(m) is not None for r in summary)]


def markdown(summary: list[dict], by: list[str], metrics: list[str], links=None) -> str:
    metrics = _present(summary, metrics)
    head = by + ["n"] + [METRICS.get(m, (m,))[0] for m in metrics] + (["runs"] if links else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [str(r["key"][k]) for k in by] + [str(r["n"])]
        cells += [_cell(r["stats"][m], METRICS.get(m, (m, lambda v: f"{v:.4g}"))[1], "±",
                        r.get("stderr", {}).get(m)) for m in metrics]
        if links:
            cells.append(" ".join(links(p) for p in r["paths"]))
        lines.append("| " + " | ".join(cells) + " |")
    if _has_stderr(summary, metrics):
        lines += ["", STDERR_NOTE]
    return "\n".join(lines)


def _tex(s: str) -> str:
    return (str(s).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")
            .replace("&", r"\&").replace("#", r"\#"))


def latex(summary: list[dict], by: list[str], metrics: list[str], caption: str = "") -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    metrics = _present(summary, metrics)
    cols = "l" * (len(by) + 1) + "r" * len(metrics)
    head = [_tex(k) for k in by] + ["$n$"] + [_tex(METRICS.get(m, (m,))[0]) for m in metrics]
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    for r in summary:
        cells = [_tex(r["key"][k]) for k in by] + [str(r["n"])]
        cells += [_cell(r["stats"][m], METRICS.get(m, (m, lambda v: f"{v:.4g}"))[1], r"$\pm$",
                        r.get("stderr", {}).get(m)) for m in metrics]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption or _has_stderr(summary, metrics):
        note = STDERR_NOTE if _has_stderr(summary, metrics) else ""
        lines.append(rf"\caption{{{_tex(' '.join(x for x in (caption, note) if x))}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines)
