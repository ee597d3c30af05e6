"""Logical axis names for every leaf of the params tree, mapped to mesh axes by rules.

The names are MaxText's vocabulary (layers, embed, heads, kv_heads, mlp, vocab, plus norm and
lora_rank); `flax.linen.logical_to_mesh_axes` turns a leaf's names into a PartitionSpec under
the rules, as MaxText does. The params are a plain dict (not Flax modules), so the names come
from the leaf's place in the tree (`LEAF_AXES`), and adapters take their kernel's input or
output axis. Optimizer state follows its param (`shardings_like`).

A mesh axis that does not divide a leaf's dimension (SmolLM2's 3 KV heads over tensor=2) is
dropped for that dimension and the leaf is replicated along it; `param_shardings` returns what
it dropped so the caller can say so."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alpaca_jax.model.params import ADAPTERS, LAYERS

BATCH = ("data", "fsdp")   # the mesh axes a batch dimension is split over

# logical axis -> mesh axis (None: replicated); MaxText's defaults for these names
DEFAULT_RULES = {
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    "lora_rank": None,
}

LEAF_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("norm",),
    f"{LAYERS}/attn_norm": ("layers", "norm"),
    f"{LAYERS}/mlp_norm": ("layers", "norm"),
    f"{LAYERS}/wq": ("layers", "embed", "heads"),
    f"{LAYERS}/wk": ("layers", "embed", "kv_heads"),
    f"{LAYERS}/wv": ("layers", "embed", "kv_heads"),
    f"{LAYERS}/wo": ("layers", "heads", "embed"),
    f"{LAYERS}/w_gate": ("layers", "embed", "mlp"),
    f"{LAYERS}/w_up": ("layers", "embed", "mlp"),
    f"{LAYERS}/w_down": ("layers", "mlp", "embed"),
}


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def logical_axes(names: list[str], ndim: int) -> tuple:
    """The logical axes of the leaf at tree path `names` (e.g. `["layers", "wq"]`,
    `["layers", "lora", "wq", "a"]`)."""
    key = "/".join(names)
    if key in LEAF_AXES:
        axes = LEAF_AXES[key]
    elif len(names) == 4 and names[0] == LAYERS and names[1] == ADAPTERS:
        _, d_in, d_out = LEAF_AXES[f"{LAYERS}/{names[2]}"]
        axes = {"a": ("layers", d_in, "lora_rank"), "b": ("layers", "lora_rank", d_out),
                "m": ("layers", d_out),                    # DoRA's magnitude: one per output
                "scale": ("layers",), "dropout": ("layers",)}.get(names[3])
        if axes is None:
            raise ValueError(f"{key}: an adapter leaf with no logical axes (known: a, b, m, "
                             "scale, dropout)")
    else:
        raise ValueError(f"{key}: a params leaf with no logical axes; name them in "
                         "alpaca_jax/parallel/logical.py:LEAF_AXES")
    if len(axes) != ndim:
        raise ValueError(f"{key}: {ndim} dimensions, but its logical axes are {axes}")
    return axes


def _rules(overrides: dict | None) -> tuple:
    rules = {**DEFAULT_RULES, **(overrides or {})}
    unknown = set(overrides or {}) - set(DEFAULT_RULES)
    if unknown:
        raise ValueError(f"mesh.rules: unknown logical axes {sorted(unknown)}; known: "
                         f"{sorted(DEFAULT_RULES)}")
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items())


def _fit(spec: P, shape: tuple, mesh: Mesh) -> tuple[P, list]:
    """`spec` with every mesh axis that does not divide its dimension removed."""
    out, dropped = [], []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        group = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in group]))
        if size > 1 and dim % size:
            dropped.append((dim, axes))
            out.append(None)
        else:
            out.append(axes)
    return P(*out), dropped


def _spec(names: list[str], shape: tuple, mesh: Mesh, rules_t: tuple) -> tuple[P, list]:
    """The leaf's PartitionSpec under the rules, fitted to its shape (`_fit`)."""
    import flax.linen as nn   # here, not at import: the model core does not need Flax

    spec = nn.logical_to_mesh_axes(logical_axes(names, len(shape)), rules_t)
    return _fit(spec, tuple(shape), mesh)


def param_shardings(params, mesh: Mesh, rules: dict | None = None):
    """`(shardings, dropped)`: a NamedSharding per leaf by the logical rules, and
    `{path: [(dim size, mesh axes)]}` where a mesh axis was dropped for not dividing."""
    rules_t = _rules(rules)
    dropped = {}

    def one(path, leaf):
        names = _path_names(path)
        spec, lost = _spec(names, np.shape(leaf), mesh, rules_t)
        if lost:
            dropped["/".join(names)] = lost
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, params), dropped


def leaf_sharding(mesh: Mesh, rules: dict | None = None):
    """`(path, shape) -> NamedSharding` for the loaders (`io/layout.py: sharding_for`), paths
    as `"layers/wq"`: each tensor goes straight onto its place on the mesh."""
    rules_t = _rules(rules)

    def one(path: str, shape: tuple) -> NamedSharding:
        return NamedSharding(mesh, _spec(path.split("/"), shape, mesh, rules_t)[0])
    return one


def place_tree(tree, shardings):
    """Every leaf onto its sharding (a no-op for a leaf already there)."""
    return jax.tree_util.tree_map(jax.device_put, tree, shardings)


def shardings_like(tree, params, shardings, mesh: Mesh):
    """Shardings for `tree` (an optimizer state): a leaf whose tree path ends with a param's
    path and whose shape is that param's takes the param's sharding (AdamW's moments);
    anything else (step counts) is replicated."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree_util.tree_leaves(shardings)):
        by_path[tuple(_path_names(path))] = (np.shape(leaf), sh)

    def one(path, leaf):
        names = tuple(_path_names(path))
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, shape: tuple, axis: int = 0) -> NamedSharding:
    """Dimension `axis` split over data x fsdp (replicated when it does not divide)."""
    spec = [None] * len(shape)
    if shape[axis] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
        spec[axis] = BATCH
    return NamedSharding(mesh, P(*spec))


def constrain_batch(x, axis: int = 0):
    """Inside a jitted function under a mesh context (`jax.set_mesh`): split `x`'s batch
    dimension over data x fsdp where it divides, so every stage's forward is data parallel
    whatever its caller passed (numpy inputs arrive replicated). Outside a mesh: `x`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
        return x
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if n == 1 or x.shape[axis] % n:
        return x
    spec = [None] * x.ndim
    spec[axis] = BATCH
    return jax.lax.with_sharding_constraint(x, P(*spec))
