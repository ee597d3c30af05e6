"""The PEFT method protocol and registry.

A method is one object (a `PeftMethod` subclass instance) that says everything the rest of the
code needs about an adapter kind:

- its leaves: `trainable` (what the optimizer sees, `is_adapter`) and the fixed `settings`
  (`scale`, `dropout`); the set of leaves identifies the method of an adapter dict
  (`method_of`), so the tree needs no side record and no string leaf;
- `init` (the PEFT initialisation) and `neutral` (leaves that change nothing, for layers an HF
  file leaves out), `shapes` (checked by `check_adapters`) and `rank`;
- the math: `weight(w, ad)` (the effective weight, which `merge` stores) and
  `linear(x, w, ad, rng=)` (what the forward computes, possibly factored, with dropout when a
  key is given);
- HF `peft`: `hf_peft_type` and `hf_config` (the adapter_config.json entries that select it),
  `hf_tensors` (tensor kind -> the suffix written), `to_hf` / `from_hf` for one layer
  (`peft/hf_peft.py` does the rest: ranks, alphas, patterns, dropout).

Adapter dicts (`params['layers']['lora'][kernel]`) hold stacked leaves `[L, ...]`; `weight` takes
any leading axes, `linear` gets one block's slice.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

SETTINGS = ("scale", "dropout")   # fixed per-layer settings every method carries


class PeftMethod:
    name: str = ""
    trainable: tuple[str, ...] = ()
    settings: tuple[str, ...] = SETTINGS
    hf_peft_type: str = "LORA"
    hf_config: Mapping = {}        # adapter_config.json entries that select this method
    hf_tensors: Mapping = {}       # peft tensor kind -> suffix written after the module path

    @property
    def leaves(self) -> frozenset:
        return frozenset(self.trainable) | frozenset(self.settings)

    def init(self, key: jax.Array, w: jax.Array, rank: int) -> dict:
        """Trainable leaves (float32, stacked) for the stacked kernel `w` `[L, in, out]`."""
        raise NotImplementedError

    def neutral(self, w: np.ndarray, rank: int) -> dict:
        """Trainable leaves (numpy float32, stacked) with which the layer is unchanged."""
        raise NotImplementedError

    def shapes(self, L: int, d_in: int, d_out: int, rank: int) -> dict:
        """The shape of every trainable leaf."""
        raise NotImplementedError

    def rank(self, ad: dict) -> int:
        raise NotImplementedError

    def weight(self, w: jax.Array, ad: dict) -> jax.Array:
        """The effective weight in `w`'s dtype (computed in float32), any leading axes."""
        raise NotImplementedError

    def linear(self, x: jax.Array, w: jax.Array, ad: dict, *, rng=None) -> jax.Array:
        """`x @ weight(w, ad)` for one block, with adapter dropout drawn from `rng` if given."""
        raise NotImplementedError

    def to_hf(self, ad: dict) -> dict:
        """One layer's trainable leaves -> `{peft tensor kind: float32 array}`."""
        raise NotImplementedError

    def from_hf(self, tensors: dict, d_in: int, d_out: int, where: str) -> dict:
        """One layer's `{peft tensor kind: array}` -> trainable leaves (float32); a ValueError
        starting with `where` for tensors that do not fit `[d_in, d_out]`."""
        raise NotImplementedError

    def matches_hf_config(self, conf: dict) -> bool:
        return conf.get("peft_type") == self.hf_peft_type and all(
            (conf.get(k) or False) == v for k, v in self.hf_config.items())

    def __repr__(self):
        return f"<PEFT method {self.name!r}>"


PEFT_METHODS: dict[str, PeftMethod] = {}


def _describe() -> str:
    return ", ".join(PEFT_METHODS) or "(none)"


def register_peft_method(method: PeftMethod) -> PeftMethod:
    """Add `method` under `method.name`. Its leaf set must differ from every registered method's
    (it is how an adapter's method is recognised) and a leaf name must be trainable in all
    methods or in none (`is_adapter` sees only the leaf's path)."""
    if not method.name or not method.trainable:
        raise ValueError(f"{method!r} needs a name and trainable leaves")
    for other in PEFT_METHODS.values():
        if other.name == method.name:
            raise ValueError(f"a PEFT method named {method.name!r} is already registered")
        if other.leaves == method.leaves:
            raise ValueError(f"PEFT method {method.name!r} has the same leaves as "
                             f"{other.name!r} ({sorted(method.leaves)}); adapters could not "
                             "be told apart")
        clash = (set(method.trainable) & set(other.settings)) | (
            set(method.settings) & set(other.trainable))
        if clash:
            raise ValueError(f"PEFT method {method.name!r}: leaves {sorted(clash)} are "
                             f"trainable in one of {method.name!r}, {other.name!r} and fixed in "
                             "the other")
    PEFT_METHODS[method.name] = method
    return method


def get_peft_method(name: str) -> PeftMethod:
    """The registered method called `name`, or a ValueError naming the registered ones."""
    method = PEFT_METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"adapter method {name!r} is not a registered PEFT method; "
                         f"registered: {_describe()}")
    return method


def method_of(ad: dict) -> PeftMethod:
    """The method of one adapter dict, recognised by its set of leaves."""
    keys = frozenset(ad)
    for method in PEFT_METHODS.values():
        if method.leaves == keys:
            return method
    known = "; ".join(f"{m.name}: {sorted(m.leaves)}" for m in PEFT_METHODS.values())
    raise ValueError(f"an adapter with leaves {sorted(keys)} matches no registered PEFT method "
                     f"({known})")


def trainable_leaves() -> frozenset:
    """Every registered method's trainable leaf names (what `is_adapter` selects)."""
    return frozenset(k for m in PEFT_METHODS.values() for k in m.trainable)


def effective_weight(w: jax.Array, ad: dict) -> jax.Array:
    """The weight `w` with adapter `ad` folded in, by the adapter's method (any leading axes,
    computed in float32, returned in `w`'s dtype)."""
    return method_of(ad).weight(w, ad)
