"""Packing examples into fixed-length rows, and the deterministic, resumable batch stream."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedRows:
    """`[N, T]` arrays. `segment_ids` is 0 for padding and 1.. for examples, so attention and
    loss never cross an example boundary; `positions` restart at 0 in every example."""
    tokens: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    def __len__(self):
        return self.tokens.shape[0]

    def rows(self, idx) -> dict:
        return {"tokens": self.tokens[idx], "loss_mask": self.loss_mask[idx],
                "segment_ids": self.segment_ids[idx], "positions": self.positions[idx]}


def pack(ids: list[np.ndarray], loss_mask: list[np.ndarray], seq_len: int, pad_id: int = 0,
         packing: bool = True) -> PackedRows:
    """Greedy in-order packing (or one example per row when `packing=False`)."""
    rows: list[list[int]] = []
    used = seq_len + 1
    for n, x in enumerate(ids):
        if x.size > seq_len:
            raise ValueError(f"example {n} has {x.size} tokens > seq_len={seq_len}; "
                             "set the cutoff length <= seq_len")
        if not packing or used + x.size > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(n)
        used += x.size
    N = len(rows)
    out = PackedRows(np.full((N, seq_len), pad_id, np.int32), np.zeros((N, seq_len), np.float32),
                     np.zeros((N, seq_len), np.int32), np.zeros((N, seq_len), np.int32))
    for r, members in enumerate(rows):
        t = 0
        for seg, n in enumerate(members, start=1):
            k = ids[n].size
            out.tokens[r, t:t + k] = ids[n]
            out.loss_mask[r, t:t + k] = loss_mask[n]
            out.segment_ids[r, t:t + k] = seg
            out.positions[r, t:t + k] = np.arange(k)
            t += k
    return out


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Row indices of batch `step` in an endless stream of seeded per-epoch permutations.
    A pure function of (step, seed): resuming at step s replays exactly what an uninterrupted
    run sees, and no row is dropped at epoch ends (batches straddle epochs)."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), n_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        idx.extend(perm[offset:offset + batch_size - len(idx)].tolist())
    return np.asarray(idx)
