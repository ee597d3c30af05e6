"""Assemble the params pytree from any checkpoint that stores per-layer `[out, in]` weights
under per-layer names (HF safetensors, GGUF): one place checks names and shapes, transposes
kernels to `[in, out]` and stacks layers on axis 0."""
from __future__ import annotations

from typing import Callable

import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.params import checkpoint_layer_shapes


def assemble_params(read: Callable[[str], np.ndarray | None], cfg: ModelConfig, names: dict,
                    source: str, fix: Callable[[str, np.ndarray], np.ndarray] | None = None,
                    ) -> dict:
    """`read(name)` returns an array or None; `names` holds `embed`, `final_norm`, `lm_head`
    and `layers: {ours: "template with {i}"}`; `fix(ours, w)` adjusts a layer weight in the
    checkpoint's layout (GGUF un-permutes q/k there)."""

    def get(name, shape):
        arr = read(name)
        if arr is None:
            raise ValueError(f"{source}: missing tensor {name!r} (expected shape {shape})")
        if arr.shape != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {arr.shape}, "
                             f"expected {shape} from the model config")
        return arr

    D, V = cfg.hidden_size, cfg.vocab_size
    shapes = checkpoint_layer_shapes(cfg)
    layers = {}
    for ours, template in names["layers"].items():
        per_layer = []
        for i in range(cfg.num_layers):
            w = get(template.format(i=i), shapes[ours])
            if fix is not None:
                w = fix(ours, w)
            per_layer.append(w.T if w.ndim == 2 else w)
        layers[ours] = np.stack(per_layer)
    params = {"embed": get(names["embed"], (V, D)), "layers": layers,
              "final_norm": get(names["final_norm"], (D,))}
    if not cfg.tie_embeddings:
        params["lm_head"] = get(names["lm_head"], (V, D)).T
    return params
