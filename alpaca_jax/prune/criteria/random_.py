"""`random`: seeded uniform scores, the baseline every criterion must beat."""
from __future__ import annotations

import numpy as np

from alpaca_jax.prune.registry import register_criterion


@register_criterion("random", needs_calibration=False, summary="seeded uniform scores")
def random_scores(params, cfg, ids, *, batch_size, seed, materialize) -> np.ndarray:
    return np.random.default_rng(seed).random(cfg.num_layers)
