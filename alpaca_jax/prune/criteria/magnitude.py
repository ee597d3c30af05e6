"""`magnitude`: sum of |W| over a block's nine weights (adapters merged first). Needs no
calibration data: a weight-only baseline."""
from __future__ import annotations

import numpy as np

from alpaca_jax.prune.registry import register_criterion
from alpaca_jax.prune.scores import BLOCK_WEIGHTS, merged, per_layer_abs_sum


def magnitude_scores(params) -> np.ndarray:
    layers = params["layers"]
    return np.sum([per_layer_abs_sum(layers[k]) for k in BLOCK_WEIGHTS], axis=0)


@register_criterion("magnitude", needs_calibration=False,
                    summary="sum |W| over the block's nine weights")
def _score(params, cfg, ids, *, batch_size, seed, materialize) -> np.ndarray:
    return magnitude_scores(merged(params))
