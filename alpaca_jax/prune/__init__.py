"""Depth pruning (Shortened LLaMA, Kim et al. 2024): score blocks, choose, remove.

    from alpaca_jax.prune import block_scores, select_blocks, drop_layers
    scores = block_scores(params, cfg, calib_ids, "ppl")          # [L], lower = remove first
    idx = select_blocks(scores, n=6, criterion="ppl")             # keep_first/keep_last optional
    params, cfg = drop_layers(params, cfg, idx)
"""
from alpaca_jax.prune.calibration import calibration_ids, check_calibration, sample_windows
from alpaca_jax.prune.scores import CRITERIA, block_scores, removal_ppl
from alpaca_jax.prune.select import (block_order, check_n_blocks, drop_layers, n_blocks_for,
                                     protection, prune_plan, select_blocks)

__all__ = ["block_scores", "select_blocks", "drop_layers", "prune_plan", "calibration_ids",
           "sample_windows", "check_calibration", "removal_ppl", "block_order", "n_blocks_for",
           "protection", "check_n_blocks", "CRITERIA"]
