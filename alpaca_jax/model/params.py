"""The parameter pytree: a plain nested dict, per-layer weights stacked with the layer axis first.

Kernels are stored `[in, out]` (x @ W), so HF's `[out, in]` torch weights are transposed on
import. Layout (docs/ARCHITECTURE.md):
    embed [V, D]; layers: attn_norm [L, D], wq [L, D, Hq*Dh], wk/wv [L, D, Hkv*Dh],
    wo [L, Hq*Dh, D], mlp_norm [L, D], w_gate/w_up [L, D, F], w_down [L, F, D];
    final_norm [D]; lm_head [D, V] (absent when embeddings are tied).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.config import ModelConfig

LAYERS = "layers"            # the scope of per-block leaves (stacked, layer axis first)
# The forward adds this to each block's params slice: the block's index, for transforms whose
# choice varies by layer (a llama.cpp K-quant mix quantizes some layers' kernels differently).
LAYER_INDEX = "layer_index"
LAYER_KERNELS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
LAYER_NORMS = ("attn_norm", "mlp_norm")
TOP_WEIGHTS = ("embed", "lm_head")
ADAPTERS = "lora"            # adapters live under params['layers'][ADAPTERS] (peft/)


class WeightName(NamedTuple):
    """One leaf of the params tree by scope and name: `("layers", "wq")` (a per-block kernel,
    stacked; a transform sees it as `"wq"` in one block's tree) or `(None, "embed")`. `key` is
    the flat form used by quantization specs, GGUF plans and sharding paths (`"layers/wq"`,
    `"embed"`); this is the one place that builds or splits it."""
    scope: str | None
    kernel: str

    @property
    def key(self) -> str:
        return self.kernel if self.scope is None else f"{self.scope}/{self.kernel}"

    @classmethod
    def parse(cls, name: str) -> "WeightName":
        """From a flat key (`"layers/wq"`, `"embed"`) or a transform's name (`"wq"`, a block
        leaf; `"embed"`, `"lm_head"`)."""
        scope, sep, kernel = name.rpartition("/")
        if sep:
            if scope != LAYERS or kernel not in LAYER_KERNELS + LAYER_NORMS:
                raise ValueError(f"{name!r} is not a leaf of the params tree")
            return cls(LAYERS, kernel)
        if name in TOP_WEIGHTS:
            return cls(None, name)
        if name in LAYER_KERNELS + LAYER_NORMS:
            return cls(LAYERS, name)
        raise ValueError(f"{name!r} is not a weight of the params tree (expected one of "
                         f"{TOP_WEIGHTS + LAYER_KERNELS + LAYER_NORMS} or 'layers/<name>')")

    def get(self, params: dict):
        return params[self.kernel] if self.scope is None else params[self.scope][self.kernel]

    def put(self, params: dict, value) -> dict:
        """A shallow copy of `params` with this leaf replaced."""
        if self.scope is None:
            return {**params, self.kernel: value}
        return {**params, self.scope: {**params[self.scope], self.kernel: value}}


LAYER_WEIGHTS = tuple(WeightName(LAYERS, k) for k in LAYER_KERNELS)


def param_shapes(cfg: ModelConfig) -> dict:
    """The shape of every leaf `init_params` makes, in the same nested layout."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D),
            "wq": (L, D, cfg.q_size),
            "wk": (L, D, cfg.kv_size),
            "wv": (L, D, cfg.kv_size),
            "wo": (L, cfg.q_size, D),
            "mlp_norm": (L, D),
            "w_gate": (L, D, F),
            "w_up": (L, D, F),
            "w_down": (L, F, D),
        },
        "final_norm": (D,),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def checkpoint_layer_shapes(cfg: ModelConfig) -> dict:
    """Per-layer shapes in the `[out, in]` layout that HF and GGUF checkpoints store."""
    return {name: tuple(reversed(shape[1:])) for name, shape in param_shapes(cfg)["layers"].items()}


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random init as `transformers` does for LLaMA: N(0, std) kernels, unit norms."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            leaves.append(jnp.ones(shape, dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Raise a ValueError naming the first missing, extra or misshaped tensor.

    Extra leaves under `layers` are allowed (adapters and other transforms add them) as long as
    their leading axis is the layer axis.
    """
    expected = param_shapes(cfg)

    def walk(exp, got, prefix):
        if not isinstance(got, dict):
            raise ValueError(f"params{prefix} should be a dict, got {type(got).__name__}")
        for name, shape in exp.items():
            path = f"{prefix}['{name}']"
            if name not in got:
                raise ValueError(f"missing tensor params{path} (expected shape {shape})")
            if isinstance(shape, dict):
                walk(shape, got[name], path)
            elif tuple(np.shape(got[name])) != tuple(shape):
                raise ValueError(
                    f"tensor params{path} has shape {tuple(np.shape(got[name]))}, "
                    f"expected {tuple(shape)} for this ModelConfig"
                )
        extra = sorted(set(got) - set(exp))
        if prefix == "['layers']":
            for name in extra:
                for p, leaf in jax.tree_util.tree_flatten_with_path(got[name])[0]:
                    lead = np.shape(leaf)[:1]
                    if lead != (cfg.num_layers,):
                        raise ValueError(
                            f"tensor params['layers']['{name}']{jax.tree_util.keystr(p)} has "
                            f"leading axis {lead}, expected the layer axis ({cfg.num_layers},)"
                        )
        elif extra:
            raise ValueError(f"unexpected tensors params{prefix}: {extra}")

    walk(expected, params, "")


def count_params(params: dict) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
