"""Depth pruning (Shortened LLaMA, Kim et al. 2024; ShortGPT; Gromov et al. 2024): score
blocks, choose, remove.

    from alpaca_jax.prune import block_scores, select_blocks, drop_layers, prune_plan
    scores = block_scores(params, cfg, calib_ids, "ppl")          # [L], lower = remove first
    idx = select_blocks(scores, n=6, criterion="ppl")             # keep_first/keep_last optional
    params, cfg = drop_layers(params, cfg, idx)
    plan = prune_plan(params, cfg, calib_ids, "angular", n=6)     # any criterion: plan["pruned"]

Criteria are registered by name (`registry.py`, one module each in `criteria/`):
`get_criterion(name)` has their metadata, `criterion_needs_calibration(name)` says whether to
sample calibration ids, `CRITERIA` is the tuple of registered names.
"""
from alpaca_jax.prune.calibration import calibration_ids, check_calibration, sample_windows
from alpaca_jax.prune.registry import (Criterion, canonical_criterion, criterion_names,
                                       criterion_needs_calibration, get_criterion,
                                       register_criterion, registered_criteria)
from alpaca_jax.prune.scores import block_scores, removal_ppl
from alpaca_jax.prune.select import (block_order, check_n_blocks, drop_layers, n_blocks_for,
                                     protection, prune_plan, select_blocks)
from alpaca_jax.prune import criteria  # noqa: E402,F401  registers the criteria (after select)

__all__ = ["block_scores", "select_blocks", "drop_layers", "prune_plan", "calibration_ids",
           "sample_windows", "check_calibration", "removal_ppl", "block_order", "n_blocks_for",
           "protection", "check_n_blocks", "CRITERIA", "Criterion", "canonical_criterion",
           "criterion_names", "criterion_needs_calibration", "get_criterion",
           "register_criterion", "registered_criteria"]


def __getattr__(attr):   # CRITERIA: the registered names, read when asked (PEP 562)
    if attr == "CRITERIA":
        return criterion_names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
