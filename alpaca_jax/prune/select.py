"""Choosing blocks from scores, removing them, and the whole one-shot / iterative procedure.

What differs between criteria (default protection, calibration, a plan-level choice, iterative
support) is read from the criterion's registry record (`prune/registry.py`), never branched on
its name here."""
from __future__ import annotations

import math

import jax
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.adapters import adapted
from alpaca_jax.prune.calibration import check_calibration
from alpaca_jax.prune.registry import get_criterion, iterative_criteria
from alpaca_jax.prune.scores import block_scores, calibration_for


# The paper's "+" heuristic (Taylor+: never remove the first four or the last two blocks) is the
# taylor+ criterion's registered default. The authors' released code applies it to every
# criterion; pass keep_first/keep_last to do that.
def protection(criterion: str, keep_first: int | None = None,
               keep_last: int | None = None) -> tuple[int, int]:
    """(keep_first, keep_last): explicit values win; None takes the criterion's registered
    default (the paper's: 4 and 2 for taylor+, else 0)."""
    first, last = get_criterion(criterion).protection
    first = first if keep_first is None else keep_first
    last = last if keep_last is None else keep_last
    if first < 0 or last < 0:
        raise ValueError(f"keep_first/keep_last must be >= 0, got {first}, {last}")
    return int(first), int(last)


def removable_blocks(num_layers: int, keep_first: int, keep_last: int) -> list[int]:
    return list(range(keep_first, num_layers - keep_last))


def check_n_blocks(n, num_layers: int, keep_first: int = 0, keep_last: int = 0) -> None:
    """A clear error when n blocks cannot be removed under the protection."""
    removable = removable_blocks(num_layers, keep_first, keep_last)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"number of blocks to remove must be an int >= 0, got {n!r}")
    limit = min(len(removable), num_layers - 1)   # at least one block must remain
    if n > limit:
        raise ValueError(f"cannot remove {n} of {num_layers} blocks: only {limit} are removable "
                         f"(keep_first={keep_first}, keep_last={keep_last}, and one block must "
                         f"remain)")


def block_order(scores, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """Removable blocks by ascending score (ties: lower index first)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or np.isnan(scores).any():
        raise ValueError(f"block scores must be a 1-D array without NaN, got {scores}")
    allowed = set(removable_blocks(scores.size, keep_first, keep_last))
    return [int(i) for i in np.argsort(scores, kind="stable") if int(i) in allowed]


def select_blocks(scores, n: int, keep_first: int | None = None, keep_last: int | None = None,
                  criterion: str = "ppl") -> list[int]:
    """The n blocks to remove (sorted): the lowest scores outside the protected first/last
    blocks. keep_first/keep_last None: the paper's default for `criterion` (taylor+: 4 and 2).
    A criterion that chooses its blocks as a whole (angular: a contiguous run) needs
    `prune_plan` for n > 1."""
    c = get_criterion(criterion)
    kf, kl = protection(c.name, keep_first, keep_last)
    L = len(scores)
    check_n_blocks(n, L, kf, kl)
    if not c.per_block and n > 1:
        raise ValueError(f"criterion {c.name!r} does not choose the n lowest per-block scores; "
                         f"use prune_plan(params, cfg, calib_ids, {c.name!r}, n)")
    return sorted(block_order(scores, kf, kl)[:n])


def lowest_scores(scores, n: int, keep_first: int = 0, keep_last: int = 0) -> dict:
    """The per-block choice as a plan record: scores, order (removable blocks by ascending
    score), pruned (the first n, sorted)."""
    order = block_order(scores, keep_first, keep_last)
    return {"scores": [float(s) for s in scores], "order": order, "pruned": sorted(order[:n])}


def n_blocks_for(ratio: float, num_layers: int) -> int:
    """The largest n with n / num_layers <= ratio (20% of 32 is 6, 35% is 11; 20% of 30 is 6)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    return int(math.floor(ratio * num_layers + 1e-9))


def drop_layers(params: dict, cfg: ModelConfig, idx) -> tuple[dict, ModelConfig]:
    """Remove blocks `idx` from every leaf under `params['layers']` (adapters included) and
    return the smaller model's params and config."""
    L = cfg.num_layers
    idx = [int(i) for i in idx]
    bad = [i for i in idx if not 0 <= i < L]
    if bad:
        raise ValueError(f"block indices {bad} are outside [0, {L})")
    if len(set(idx)) != len(idx):
        raise ValueError(f"block indices {idx} list a block more than once")
    if len(idx) >= L:
        raise ValueError(f"cannot remove all {L} blocks")
    keep = np.array([i for i in range(L) if i not in set(idx)], np.int32)
    layers = jax.tree.map(lambda x: x[keep], params["layers"])
    return {**params, "layers": layers}, cfg.replace(num_layers=int(keep.size))


def prune_plan(params, cfg: ModelConfig, calib_ids, criterion: str, n: int, *,
               keep_first: int | None = None, keep_last: int | None = None,
               iterative: bool = False, batch_size: int | None = None, seed: int = 0,
               materialize=adapted) -> dict:
    """Score and choose n blocks. One-shot: the criterion's `plan` hook if it has one (ppl adds
    the base perplexity, angular picks a contiguous run), else the n lowest scores. Iterative
    (criteria with an `iterate` hook: ppl): after each removal re-score the remaining blocks on
    the pruned model. Returns the record that `block_scores.json` and the recipe hold:
    criterion, scores, order, pruned, ..."""
    c = get_criterion(criterion)
    kf, kl = protection(c.name, keep_first, keep_last)
    L = cfg.num_layers
    check_n_blocks(n, L, kf, kl)
    if iterative and not c.supports_iterative:
        raise ValueError(f"iterative pruning re-scores with the "
                         f"{' or '.join(iterative_criteria())} criterion; got {c.name!r}")
    record = {"criterion": c.name, "iterative": bool(iterative), "num_layers": L,
              "keep_first": kf, "keep_last": kl, "n": int(n)}
    if calib_ids is not None:
        calib_ids = check_calibration(calib_ids, cfg.vocab_size)
        record["calibration_shape"] = list(calib_ids.shape)
    ids = calibration_for(c, cfg, calib_ids, batch_size)
    kw = dict(batch_size=batch_size, seed=seed, materialize=materialize)
    if iterative:
        return {**record, **c.iterate(params, cfg, ids, int(n), kf, kl, **kw)}
    if c.plan is not None:
        return {**record, **c.plan(params, cfg, ids, int(n), kf, kl, **kw)}
    return {**record, **lowest_scores(block_scores(params, cfg, ids, c.name, **kw), n, kf, kl)}
