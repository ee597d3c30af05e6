"""Adapters as `params -> params` transforms, for any registered PEFT method (LoRA, DoRA:
`peft/methods/`): `add_lora` puts adapters in the tree (layout in `alpaca_jax.model.adapters`),
`merge` folds them into the base weights, `is_adapter` is the trainable predicate for
`train(..., trainable=is_adapter)`."""
from __future__ import annotations

import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.params import ADAPTERS, check_params
from alpaca_jax.peft.methods import (PEFT_METHODS, effective_weight, get_peft_method, method_of,
                                     trainable_leaves)
from alpaca_jax.peft.targets import KERNELS, resolve_targets

METHODS = tuple(PEFT_METHODS)   # the built-in methods at import; the registry is PEFT_METHODS
SCALINGS = ("standard", "rslora")
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def lora_scale(alpha: float, rank: int, scaling: str) -> float:
    """PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if scaling not in SCALINGS:
        raise ValueError(f"adapter scaling {scaling!r} is not one of {SCALINGS}")
    return alpha / math.sqrt(rank) if scaling == "rslora" else alpha / rank


def is_adapter(path: str) -> bool:
    """Trainable predicate: adapter weights (each registered method's `trainable` leaves: a, b
    and DoRA's m), not their fixed settings and not the base model. `path` is a
    `jax.tree_util.keystr`."""
    return f"['{ADAPTERS}']" in path and path.endswith(
        tuple(f"['{k}']" for k in trainable_leaves()))


def has_adapters(params: dict) -> bool:
    return bool(params.get("layers", {}).get(ADAPTERS))


def check_settings(rank, alpha, dropout, method, scaling) -> None:
    """Validate adapter settings before any compute (raises ValueError naming the setting)."""
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"adapter rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"adapter alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"adapter dropout must be in [0, 1), got {dropout!r}")
    get_peft_method(method)
    lora_scale(alpha, rank, scaling)


def add_lora(params: dict, cfg: ModelConfig, key: jax.Array, rank: int = 8, alpha: float = 16.0,
             targets: str | Iterable[str] = DEFAULT_TARGETS, dropout: float = 0.0,
             method: str = "lora", scaling: str = "standard") -> dict:
    """Params with adapters of the registered PEFT `method` (`PEFT_METHODS`) beside each
    targeted kernel of every block, initialised as PEFT does (A ~ kaiming-uniform(a=sqrt(5)) =
    U(+-1/sqrt(in)), B = 0; DoRA's m = the column norms of W), so the model's output is
    unchanged until training moves B."""
    check_settings(rank, alpha, dropout, method, scaling)
    peft_method = get_peft_method(method)
    check_params(params, cfg)
    if has_adapters(params):
        raise ValueError("params already hold adapters "
                         f"({sorted(params['layers'][ADAPTERS])}); merge them first")
    kernels = resolve_targets(targets)
    L = cfg.num_layers
    scale = lora_scale(alpha, rank, scaling)
    group = {}
    for k, name in zip(jax.random.split(key, len(kernels)), kernels):
        w = params["layers"][name]
        _, d_in, d_out = w.shape
        if rank > min(d_in, d_out):
            raise ValueError(f"adapter rank {rank} exceeds the smaller dimension of {name} "
                             f"({KERNELS[name][0]}: [{d_in}, {d_out}]); use rank <= "
                             f"{min(d_in, d_out)}")
        group[name] = {**peft_method.init(k, w, rank),
                       "scale": jnp.full((L,), scale, jnp.float32),
                       "dropout": jnp.full((L,), dropout, jnp.float32)}
    return {**params, "layers": {**params["layers"], ADAPTERS: group}}


def merge(params: dict) -> dict:
    """Fold every adapter into its base weight (in float32, stored in the weight's dtype) and
    drop the adapter leaves; the result is a plain model with the same logits."""
    group = params.get("layers", {}).get(ADAPTERS)
    if not group:
        return params
    layers = {k: v for k, v in params["layers"].items() if k != ADAPTERS}
    for name, ad in group.items():
        layers[name] = _merge_layers(layers[name], ad)
    return {**params, "layers": layers}


@jax.jit
def _merge_layers(w, ad):
    # layer by layer, the same computation the forward's scan does, so a merged weight is bit
    # for bit the one the un-merged model used (QAT over LoRA relies on it: Q(merge) == Q(W_eff))
    return jax.lax.map(lambda xs: effective_weight(*xs), (w, ad))


def adapter_summary(params: dict) -> dict:
    """What the tree's adapters are, for recipes and results: method, rank, scale and dropout
    per target (from the leaves themselves)."""
    out = {}
    for name, ad in params.get("layers", {}).get(ADAPTERS, {}).items():
        scale, drop = np.asarray(ad["scale"]), np.asarray(ad["dropout"])
        out[KERNELS[name][0]] = {
            "method": method_of(ad).name, "rank": method_of(ad).rank(ad),
            "scale": float(scale[0]) if np.all(scale == scale[0]) else scale.tolist(),
            "dropout": float(drop[0]) if np.all(drop == drop[0]) else drop.tolist()}
    return out


def check_adapters(params: dict, cfg: ModelConfig) -> None:
    """Raise a ValueError naming the first adapter whose shapes do not fit the model."""
    group = params.get("layers", {}).get(ADAPTERS, {})
    L = cfg.num_layers
    for name, ad in group.items():
        where = f"params['layers']['{ADAPTERS}']['{name}']"
        if name not in KERNELS:
            raise ValueError(f"{where}: {name!r} is not a linear layer of a block")
        _, d_in, d_out = params["layers"][name].shape
        try:
            method = method_of(ad)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        r = method.rank(ad)
        want = {**method.shapes(L, d_in, d_out, r), **{s: (L,) for s in method.settings}}
        for leaf, shape in want.items():
            if tuple(np.shape(ad[leaf])) != shape:
                raise ValueError(f"{where}['{leaf}'] has shape {tuple(np.shape(ad[leaf]))}, "
                                 f"expected {shape} for {name} [{d_in}, {d_out}] with rank {r}")
