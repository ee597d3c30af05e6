"""Regenerate an ablation table in RESULTS.md from runs, with its provenance.

    python -m analysis.report RUN_DIRS... --name NAME [--title TITLE] [--by criterion,heal]
        [--metrics params,ppl_wiki,...] [--results RESULTS.md] [--archive results/NAME]
        [--latex table.tex] [--plots DIR] [--wandb ENTITY/PROJECT]

Collects every results.json under RUN_DIRS (and a W&B project's runs when it can be reached),
groups rows by --by (seeds pooled: mean ± std), writes the table between
`<!-- analysis:NAME begin/end -->` markers in --results (appended when absent) with the command,
date, commits and machine beside it, optionally copies each run's results.json into --archive
(the table links each row to it), writes LaTeX and PNG plots, and prints the section.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from analysis.collect import FACETS, collect, collect_wandb
from analysis.tables import METRICS, latex, markdown, summarize

ROOT = Path(__file__).resolve().parent.parent


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the marked section `name` replaced by `body` (appended when absent)."""
    begin, end = f"<!-- analysis:{name} begin -->", f"<!-- analysis:{name} end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        if end not in text or text.index(end) < text.index(begin):
            raise ValueError(f"the results file has '{begin}' without a matching '{end}'")
        return text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def _archive(rows, dest: Path) -> None:
    """Copy each row's results.json into `dest` and point the row at the copy."""
    dest.mkdir(parents=True, exist_ok=True)
    common = Path(os.path.commonpath([str(Path(r["path"]).resolve().parent) for r in rows]))
    for r in rows:
        src = Path(r["path"]).resolve()
        rel = src.parent.relative_to(common) if src.parent != common else Path(src.parent.name)
        out = dest / ("_".join(rel.parts) + ".json")
        shutil.copyfile(src, out)
        r["source_path"], r["path"] = str(src), str(out)


def _provenance(rows, argv) -> str:
    shas = sorted({r["git_sha"] for r in rows})
    done = sorted(r["finished"] for r in rows if r.get("finished"))
    machines = sorted({f"{m.get('platform')}, {m.get('cpus')} cpus" for m in
                       (r.get("machine") for r in rows) if isinstance(m, dict)})
    lines = [f"- Regenerated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
             f"`{' '.join(shlex.quote(a) for a in argv)}`",
             f"- Runs: {len(rows)}, at commit{'s' * (len(shas) > 1)} "
             + ", ".join(f"`{s[:12]}{'-dirty' if s.endswith('-dirty') else ''}`" for s in shas)
             + (f", finished {done[0]} to {done[-1]}" if done else ""),
             f"- Machine: {'; '.join(machines) or 'not recorded'}"]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="*", help="run folders or results.json files")
    ap.add_argument("--name", required=True, help="the section's marker name")
    ap.add_argument("--title", default=None)
    ap.add_argument("--by", default="criterion,pruned_blocks,heal,quant",
                    help=f"facets to group by (seeds pooled); of {', '.join(FACETS)}")
    ap.add_argument("--metrics", default=",".join(METRICS))
    ap.add_argument("--results", default=str(ROOT / "RESULTS.md"))
    ap.add_argument("--archive", default=None, help="copy each run's results.json here")
    ap.add_argument("--latex", default=None)
    ap.add_argument("--plots", default=None, help="folder for the PNG plots")
    ap.add_argument("--note", default="", help="text placed under the table")
    ap.add_argument("--wandb", default=None, help="also collect an ENTITY/PROJECT from W&B")
    ap.add_argument("--baseline-rows", action="store_true",
                    help="a run's baseline evaluation (the unchanged model) as a row of its own")
    args = ap.parse_args(argv)
    if not args.roots and not args.wandb:
        ap.error("give run folders or --wandb")
    by = [k for k in args.by.split(",") if k]
    bad = [k for k in by if k not in FACETS]
    if bad:
        ap.error(f"--by {bad}: not a facet; facets are {', '.join(FACETS)}")
    metrics = [m for m in args.metrics.split(",") if m]

    rows = collect(args.roots, baseline_rows=args.baseline_rows) if args.roots else []
    if args.wandb:
        rows += collect_wandb(args.wandb)
    if not rows:
        raise SystemExit(f"no results.json of a pipeline/prune/finetune run under {args.roots}")
    results = Path(args.results)
    if args.archive:
        _archive(rows, Path(args.archive))

    def link(p):
        p = Path(p).resolve()
        try:
            rel = os.path.relpath(p, results.resolve().parent)
        except ValueError:
            rel = str(p)
        return f"[{p.stem if p.name != 'results.json' else p.parent.name}]({rel})"

    summary = summarize(rows, by, metrics)
    table = markdown(summary, by, metrics, links=link)
    parts = [f"### {args.title or args.name}", "", _provenance(rows, ["python", "-m",
                                                                      "analysis.report", *argv]),
             "", table]
    if args.note:
        parts += ["", args.note]
    if args.plots:
        from analysis.plots import accuracy_vs_speed, ppl_vs_params

        for made in (ppl_vs_params(rows, Path(args.plots) / f"{args.name}_ppl_vs_params.png"),
                     accuracy_vs_speed(rows, Path(args.plots) / f"{args.name}_acc_vs_speed.png")):
            if made is not None:
                parts += ["", f"![{made.stem}]({os.path.relpath(made.resolve(), results.resolve().parent)})"]
    if args.latex:
        Path(args.latex).write_text(latex(summary, by, metrics, args.title or args.name) + "\n")
    section = "\n".join(parts)
    old = results.read_text() if results.exists() else "# Results\n"
    tmp = results.with_name(f".{results.name}.tmp")
    tmp.write_text(replace_section(old, args.name, section))
    os.replace(tmp, results)
    print(section)
    return section


if __name__ == "__main__":
    main()
