"""Trainable/frozen as a split of the params tree (docs/ARCHITECTURE.md). Gradients and optimizer state
exist only for the trainable part; `optax.masked` would not freeze anything (docs/ARCHITECTURE.md, traps)."""
from __future__ import annotations

from typing import Callable

import jax

Predicate = Callable[[str], bool]  # gets the leaf's path, e.g. "['layers']['wq']"


def train_all(path: str) -> bool:
    return True


def split(params: dict, trainable: Predicate):
    """(trainable, frozen): two trees of params' structure, each with None where the other has
    the leaf."""
    def pick(keep):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: x if trainable(jax.tree_util.keystr(p)) == keep else None, params)
    t, f = pick(True), pick(False)
    if not jax.tree_util.tree_leaves(t):
        raise ValueError("the trainable predicate selects no parameter")
    return t, f


def combine(trainable: dict, frozen: dict) -> dict:
    return jax.tree_util.tree_map(lambda a, b: b if a is None else a, trainable, frozen,
                                  is_leaf=lambda x: x is None)
