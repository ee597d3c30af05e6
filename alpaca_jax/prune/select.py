"""Choosing blocks from scores, removing them, and the whole one-shot / iterative procedure."""
from __future__ import annotations

import math

import jax
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.adapters import adapted
from alpaca_jax.prune.calibration import check_calibration
from alpaca_jax.prune.scores import block_scores, canonical_criterion, removal_ppl

# The paper's "+" heuristic (Taylor+): never remove the first four or the last two blocks. The
# authors' released code applies it to every criterion; pass keep_first/keep_last to do that.
PAPER_PROTECTION = {"taylor+": (4, 2)}


def protection(criterion: str, keep_first: int | None = None,
               keep_last: int | None = None) -> tuple[int, int]:
    """(keep_first, keep_last): explicit values win; None takes the paper's default for the
    criterion (4 and 2 for taylor+, else 0)."""
    first, last = PAPER_PROTECTION.get(canonical_criterion(criterion), (0, 0))
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
    blocks. keep_first/keep_last None: the paper's default for `criterion` (taylor+: 4 and 2)."""
    kf, kl = protection(criterion, keep_first, keep_last)
    L = len(scores)
    check_n_blocks(n, L, kf, kl)
    return sorted(block_order(scores, kf, kl)[:n])


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
    """Score and choose n blocks. One-shot: score once, take the n lowest. Iterative (ppl only):
    after each removal re-score the remaining blocks on the pruned model. Returns the record
    that `block_scores.json` and the recipe hold: criterion, scores, order, pruned, ..."""
    criterion = canonical_criterion(criterion)
    kf, kl = protection(criterion, keep_first, keep_last)
    L = cfg.num_layers
    removable = removable_blocks(L, kf, kl)
    check_n_blocks(n, L, kf, kl)
    record = {"criterion": criterion, "iterative": bool(iterative), "num_layers": L,
              "keep_first": kf, "keep_last": kl, "n": int(n)}
    if calib_ids is not None:
        calib_ids = check_calibration(calib_ids, cfg.vocab_size)
        record["calibration_shape"] = list(calib_ids.shape)
    if not iterative:
        if criterion == "ppl" and calib_ids is not None:   # the same scores, plus the baseline
            base, by_block = removal_ppl(params, cfg, calib_ids, batch_size=batch_size,
                                         materialize=materialize)
            record["base_ppl"] = base
            scores = np.array([by_block[i] for i in range(L)])
        else:
            scores = block_scores(params, cfg, calib_ids, criterion, batch_size=batch_size,
                                  seed=seed, materialize=materialize)
        order = block_order(scores, kf, kl)
        return {**record, "scores": [float(s) for s in scores], "order": order,
                "pruned": sorted(order[:n])}
    if criterion != "ppl":
        raise ValueError(f"iterative pruning re-scores with the ppl criterion; got {criterion!r}")
    if calib_ids is None:
        raise ValueError("iterative ppl pruning needs calibration ids [N, T]")
    keep, order, rounds = np.ones(L, bool), [], []
    for _ in range(n):
        cands = [i for i in removable if keep[i]]
        base, ppl = removal_ppl(params, cfg, calib_ids, keep, cands, batch_size=batch_size,
                                materialize=materialize)
        best = min(cands, key=lambda i: (ppl[i], i))
        rounds.append({"base_ppl": base, "scores": {str(i): v for i, v in ppl.items()},
                       "removed": best})
        keep[best] = False
        order.append(best)
    first = rounds[0]["scores"] if rounds else {}
    return {**record, "scores": [first.get(str(i)) for i in range(L)], "order": order,
            "pruned": sorted(order), "rounds": rounds}
