"""`ppl` (Shortened LLaMA, Kim et al. 2024): the calibration perplexity, exp(total token NLL /
tokens), of the model with that block removed. The one criterion that supports iterative
pruning: after each removal, the remaining blocks are re-scored on the pruned model. The
one-shot plan also records the unpruned model's perplexity (`base_ppl`), which the same pass
computes anyway."""
from __future__ import annotations

import numpy as np

from alpaca_jax.prune.registry import register_criterion
from alpaca_jax.prune.scores import removal_ppl
from alpaca_jax.prune.select import lowest_scores, removable_blocks


def _one_shot(params, cfg, ids, n, keep_first, keep_last, *, batch_size, seed, materialize):
    base, by_block = removal_ppl(params, cfg, ids, batch_size=batch_size, materialize=materialize)
    scores = np.array([by_block[i] for i in range(cfg.num_layers)])
    return {"base_ppl": base, **lowest_scores(scores, n, keep_first, keep_last)}


def _iterate(params, cfg, ids, n, keep_first, keep_last, *, batch_size, seed, materialize):
    """Remove the lowest-perplexity block, re-score the rest on the pruned model, n times.
    `scores` holds the first round's (None for protected blocks), `rounds` every round's."""
    L = cfg.num_layers
    removable = removable_blocks(L, keep_first, keep_last)
    keep, order, rounds = np.ones(L, bool), [], []
    for _ in range(n):
        cands = [i for i in removable if keep[i]]
        base, ppl = removal_ppl(params, cfg, ids, keep, cands, batch_size=batch_size,
                                materialize=materialize)
        best = min(cands, key=lambda i: (ppl[i], i))
        rounds.append({"base_ppl": base, "scores": {str(i): v for i, v in ppl.items()},
                       "removed": best})
        keep[best] = False
        order.append(best)
    first = rounds[0]["scores"] if rounds else {}
    return {"scores": [first.get(str(i)) for i in range(L)], "order": order,
            "pruned": sorted(order), "rounds": rounds}


@register_criterion("ppl", needs_calibration=True, plan=_one_shot, iterate=_iterate,
                    summary="calibration perplexity with the block removed")
def ppl_scores(params, cfg, ids, *, batch_size, seed, materialize) -> np.ndarray:
    _, by_block = removal_ppl(params, cfg, ids, batch_size=batch_size, materialize=materialize)
    return np.array([by_block[i] for i in range(cfg.num_layers)])
