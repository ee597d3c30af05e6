"""The registered pruning criteria, one module each. Importing a module registers its
criteria (`@register_criterion` in `prune/registry.py`); this list is the one place that loads
them, and its order is the order of `criterion_names()`.

To add a criterion: a module here with its score function under `@register_criterion(...)`, one
import line below, a test against a reference written elsewhere, a line in README.md's criteria
list and a preset in `conf/prune/` (docs/ARCHITECTURE.md, "How to add a variant")."""
from alpaca_jax.prune.criteria import ppl  # noqa: F401
from alpaca_jax.prune.criteria import taylor  # noqa: F401
from alpaca_jax.prune.criteria import magnitude  # noqa: F401
from alpaca_jax.prune.criteria import bi  # noqa: F401
from alpaca_jax.prune.criteria import random_  # noqa: F401  (named so: not the stdlib `random`)
from alpaca_jax.prune.criteria import angular  # noqa: F401
