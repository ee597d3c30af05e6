"""`adapted`, the default transform: stored weights plus whatever adapters the tree holds.

Adapters live in the params tree beside the weights they adapt (docs/ARCHITECTURE.md, "The
params tree"), one dict of stacked leaves per targeted kernel:

    params['layers']['lora'][kernel] = {'a': [L, in, r], 'b': [L, r, out], 'scale': [L],
                                        'dropout': [L], ...}   # plus the method's own (DoRA: m)

so the tree describes itself: forward, generate, perplexity and training apply whatever adapters
it holds, `merge` needs no side config, and depth pruning drops adapter rows with the rest of
the layer axis. The method of each adapter (LoRA, DoRA, ...) and its math are in the PEFT method
registry (`alpaca_jax/peft/methods/`), recognised from the adapter's leaves (`method_of`). The
transform protocol itself is `model/transform.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from alpaca_jax.model.params import ADAPTERS
from alpaca_jax.model.transform import Transform, matmul
from alpaca_jax.peft.methods import effective_weight, method_of

__all__ = ["ADAPTERS", "Adapted", "adapted", "adapter_of", "effective_weight", "Transform",
           "matmul"]


def adapter_of(tree: dict, name: str) -> dict | None:
    group = tree.get(ADAPTERS) if isinstance(tree, dict) else None
    return None if group is None else group.get(name)


@dataclass(frozen=True)
class Adapted(Transform):
    """Stored weights plus whatever adapters the tree holds; the default everywhere.

    Adapter dropout is active only when `linear` gets a key (`forward(..., rng=key)`, which the
    training step passes); evaluation and generation are deterministic, as in PEFT's eval
    mode."""

    def weight(self, tree, name):
        ad = adapter_of(tree, name)
        return tree[name] if ad is None else effective_weight(tree[name], ad)

    def linear(self, x, tree, name, *, rng=None):
        w, ad = tree[name], adapter_of(tree, name)
        if ad is None:
            return matmul(x, w)
        return method_of(ad).linear(x, w, ad, rng=rng)


adapted = Adapted()
