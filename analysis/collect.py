"""Runs into rows: every `results.json` under the given folders (pipeline, prune and finetune
runs), or the runs of a W&B project when it can be reached, as flat dicts of facets and
metrics that the tables group by."""
from __future__ import annotations

from pathlib import Path

FACETS = ("experiment", "criterion", "pruned_blocks", "prune_ratio", "heal", "objective", "quant",
          "seed")


class ResultsError(ValueError):
    """A results.json that is not what a run writes; the message names the file."""


def _read(path: Path) -> dict:
    from alpaca_jax.io.run_model import RunFormatError, read_results

    try:
        res = read_results(path)
    except RunFormatError as e:
        raise ResultsError(str(e)) from e
    for key in ("stage", "metrics"):
        if key not in res:
            raise ResultsError(f"{path}: no {key!r} (not a results.json written by a run)")
    if not isinstance(res["metrics"], dict):
        raise ResultsError(f"{path}: 'metrics' is not an object")
    return res


def _derived_facets(res: dict) -> dict:
    """Facets of a finetune/prune run, from its recipe (pipeline runs record their own)."""
    recipe = res.get("recipe") or {}
    prune = recipe.get("prune") or {}
    quant = recipe.get("quant")
    return {"experiment": res.get("stage"),
            "criterion": prune.get("criterion", "none") if prune.get("pruned") else "none",
            "pruned_blocks": len(prune.get("pruned") or []),
            "prune_ratio": (prune.get("settings") or {}).get("ratio") or 0.0,
            "heal": recipe.get("finetune", "none"),
            "quant": "none" if not quant else f"{quant['method']}_{quant['format']}",
            "seed": ((res.get("config") or {}).get("train") or {}).get("seed", 0)}


def row_of(res: dict, path: Path) -> dict:
    """One row: facets, the final evaluation's metrics (`final/`, else `after/`, `baseline/`,
    `before/`, with the prefix dropped), then every metric under its full name."""
    facets = res.get("facets") or _derived_facets(res)
    if "objective" not in facets:   # runs from before the healing objective was a setting
        healed = facets.get("heal", "none") != "none"
        facets = {**facets, "objective": "sft" if healed else "none"}
    m = res["metrics"]
    row = {"path": str(path), "stage": res["stage"], "git_sha": res.get("git_sha", "unknown"),
           "finished": res.get("finished"), "machine": res.get("machine"), **facets}
    for prefix in ("before/", "baseline/", "after/", "final/"):     # later ones win
        row.update({k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)})
    row.update(m)
    for key, pattern in (("file_mb", "/file_mb"), ("gen_tok_s_1t", "/gen_tok_s_1t"),
                         ("gen_tok_s_2t", "/gen_tok_s_2t"), ("peak_rss_mb", "/peak_rss_mb_1t")):
        # the exported file's figures (one file per pipeline run), whatever its qtype
        vals = [v for k, v in m.items() if k.startswith(("export/", "bench/"))
                and k.endswith(pattern) and "jax_fp32" not in k]
        if vals:
            row[key] = vals[0]
    return row


def baseline_row(res: dict, path: Path) -> dict | None:
    """The row of the unchanged model a run evaluated first (its `baseline/` metrics), as a
    run of its own: no prune, heal or quantization; None when the run has no baseline
    evaluation or nothing after it (then its own row is the baseline)."""
    m = res["metrics"]
    base = {k[len("baseline/"):]: v for k, v in m.items() if k.startswith("baseline/")}
    if not base or not any(k.startswith(("final/", "after/")) for k in m):
        return None
    if (res.get("config") or {}).get("run_dir"):   # a finished run's model, not the base
        return None
    row = row_of({**res, "metrics": {}}, path)
    row.update(criterion="none", pruned_blocks=0, prune_ratio=0.0, heal="none",
               objective="none", quant="none", **base)
    if "params_base" in m:
        row["params"] = m["params_base"]
    return row


def collect(roots, stages=("pipeline", "prune", "finetune"),
            baseline_rows: bool = False) -> list[dict]:
    """Rows of every results.json under `roots` (files or folders, searched recursively) whose
    stage is in `stages`; a malformed file raises, naming it. `baseline_rows`: a run that
    evaluated the unchanged model before changing it gives that evaluation a row too."""
    rows, seen = [], set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or folder")
        paths = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for path in paths:
            res = _read(path)
            if res["stage"] in stages:
                base = baseline_row(res, path) if baseline_rows else None
                if base is not None:   # a sweep's runs share one baseline: one row for it
                    key = (base.get("experiment"),      # the same figures, timing aside
                           tuple(sorted((k, v) for k, v in res["metrics"].items()
                                        if k.startswith("baseline/") and "time" not in k)))
                    if key not in seen:
                        seen.add(key)
                        rows.append(base)
                rows.append(row_of(res, path))
    return rows


def collect_wandb(project: str, filters: dict | None = None) -> list[dict]:
    """Rows from a W&B project (`entity/project`) through the public API: each run's summary
    as metrics, its config's `facets` or the pipeline settings as facets. Needs the W&B cloud
    (or a server in WANDB_BASE_URL); offline runs are read from their results.json instead."""
    import wandb

    try:
        runs = wandb.Api(timeout=20).runs(project, filters=filters or {})
        runs = list(runs)
    except Exception as e:   # the API raises several types for no network / no auth
        raise ConnectionError(f"W&B project {project!r} cannot be read ({type(e).__name__}: "
                              f"{e}); collect the runs' results.json folders instead") from e
    rows = []
    for r in runs:
        cfg = dict(r.config)
        res = {"stage": cfg.get("stage", "pipeline"), "metrics": dict(r.summary),
               "facets": cfg.get("facets"), "git_sha": cfg.get("git_sha"),
               "config": cfg, "recipe": cfg.get("recipe")}
        rows.append(row_of(res, Path(f"wandb:{project}/{r.id}")))
    return rows
