"""The prune stage's work: score, choose and record the blocks to remove (`block_scores.json`,
RESULTS_SCHEMA.md), reusing saved scores when nothing upstream changed. The criteria themselves
live in `alpaca_jax.prune`."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from alpaca_jax.paths import resolve_path


def prune_model(p, source: str, params, cfg, tok, run_dir: Path, upstream: str | None = None
                ) -> dict:
    """Score, choose and record the blocks to remove (`block_scores.json`). A re-run in the same
    run dir with the same settings (and `upstream`, a fingerprint of what changed the model
    before pruning) reuses the saved scores instead of recomputing them."""
    from alpaca_jax.prune import (calibration_ids, check_n_blocks, criterion_needs_calibration,
                                  n_blocks_for, protection, prune_plan)
    from alpaca_jax.prune.scores import canonical_criterion
    from alpaca_jax.provenance import write_json_atomic

    criterion = canonical_criterion(p.criterion)
    n = p.n_blocks if p.n_blocks is not None else n_blocks_for(p.ratio, cfg.num_layers)
    keep_first, keep_last = protection(criterion, p.keep_first, p.keep_last)
    check_n_blocks(n, cfg.num_layers, keep_first, keep_last)   # before any compute
    settings = {**dataclasses.asdict(p),
                "criterion": criterion, "model": source, "num_layers": cfg.num_layers}
    if upstream is not None:
        settings["upstream"] = upstream
    path = run_dir / "block_scores.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            print(f"reusing block scores from {path}", flush=True)
            return saved
    needs_calib = criterion_needs_calibration(criterion)
    calib = calibration_ids(resolve_path(p.calib), tok, cfg.vocab_size, n=p.calib_samples,
                            seq_len=p.calib_len, seed=p.seed) if needs_calib else None
    t0 = time.time()
    plan = prune_plan(params, cfg, calib, criterion, n, keep_first=keep_first,
                      keep_last=keep_last, iterative=p.iterative, batch_size=p.batch_size,
                      seed=p.seed)
    plan.update(scoring_time_s=round(time.time() - t0, 2), settings=settings)
    write_json_atomic(path, plan)
    print(f"block scores ({criterion}): " + " ".join(
        f"{i}:{s:.4g}" for i, s in enumerate(plan["scores"]) if s is not None), flush=True)
    return plan
