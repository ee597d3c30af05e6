"""Assemble the params pytree from any checkpoint that stores per-layer `[out, in]` weights
under per-layer names (HF safetensors, GGUF): one place checks names and shapes, transposes
kernels to `[in, out]`, stacks layers on axis 0, converts to the parameter dtype and places the
result on devices.

Memory: a checkpoint is never held whole. Each stacked leaf is built by
`jax.make_array_from_callback`, whose callback reads the layers a device's shard covers one
tensor at a time, writing each (transposed, converted) into its slot of a preallocated,
64-byte-aligned buffer. On the CPU that buffer becomes the device array without a copy; on an
accelerator it is copied over and dropped before the next leaf. Host peak is therefore the
params plus one tensor on the CPU (plus one stacked leaf, or one shard of it, elsewhere), not
the 3-4x of reading every shard, stacking and upcasting (RESULTS.md, "Memory").
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.params import LAYERS, WeightName, checkpoint_layer_shapes

PARAM_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def param_dtype(name) -> np.dtype:
    """A numpy dtype from `float32` / `bfloat16` / `float16` (or a dtype), with an error naming
    the setting for anything else (a typo such as `bf16`)."""
    if not isinstance(name, str):
        name = np.dtype(name).name
    if name not in PARAM_DTYPES:
        raise ValueError(f"param_dtype {name!r} is not supported; supported: "
                         f"{', '.join(PARAM_DTYPES)} (or auto: the checkpoint's own dtype)")
    return np.dtype(PARAM_DTYPES[name])


def host_buffer(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array whose data is `align`-byte aligned. XLA:CPU adopts such a
    buffer as the device array instead of copying it (numpy's own allocations are only 16-byte
    aligned), so placing a leaf on the CPU costs no second copy; on an accelerator the buffer
    is copied to the device and freed."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + n].view(dtype).reshape(shape)


def sharding_for(sharding, path: str, shape: tuple):
    """`sharding` is None (the first device), one Sharding for every leaf, or a function
    `(path, shape) -> Sharding` with paths such as "embed" and "layers/wq" (how a multi-device
    loader passes a mesh-derived placement)."""
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
        return sharding(path, shape)
    return sharding


def place(host: np.ndarray, path: str, sharding=None) -> jax.Array:
    """One host array onto its sharding (each device gets its slice; zero-copy on the CPU when
    `host` comes from `host_buffer`)."""
    s = sharding_for(sharding, path, host.shape)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])


def layer_slice(stacked, i: int):
    """Layer i of a stacked leaf, with a traced index: one program per leaf shape (`stacked[i]`
    on a jax.Array compiles a slice per i), and no host copy of the other layers."""
    if isinstance(stacked, np.ndarray):
        return stacked[i]
    return jax.lax.dynamic_index_in_dim(stacked, jax.numpy.int32(i), 0, keepdims=False)


def assemble_params(read: Callable[[str], np.ndarray | None], cfg: ModelConfig, names: dict,
                    source: str, fix: Callable[[str, np.ndarray], np.ndarray] | None = None,
                    dtype=np.float32, sharding=None, owned: bool = False) -> dict:
    """`read(name)` returns one tensor (any float dtype) or None; `names` holds `embed`,
    `final_norm`, `lm_head` and `layers: {ours: "template with {i}"}`; `fix(ours, w)` adjusts a
    layer weight in the checkpoint's layout (GGUF un-permutes q/k there). Returns jax arrays of
    `dtype`, placed with `sharding` (see `sharding_for`). `owned`: `read` returns fresh arrays
    nobody else holds, so one that is already aligned and of `dtype` may become the device
    array itself (a caller's array never does: mutating it would change the params)."""
    dtype = param_dtype(dtype)

    def get(name, shape):
        arr = read(name)
        if arr is None:
            raise ValueError(f"{source}: missing tensor {name!r} (expected shape {shape})")
        if arr.shape != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {arr.shape}, "
                             f"expected {shape} from the model config")
        return arr

    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    shapes = checkpoint_layer_shapes(cfg)

    def stacked(ours, template):
        per_layer = tuple(reversed(shapes[ours]))        # [in, out] (norms: [D])
        full = (L, *per_layer)

        def fill(index):
            layers = range(L)[index[0]]
            out = host_buffer((len(layers), *per_layer), dtype)
            for j, i in enumerate(layers):
                w = get(template.format(i=i), shapes[ours])
                if fix is not None:
                    w = fix(ours, w)
                out[j] = w.T if w.ndim == 2 else w          # transposed and converted in place
            return out[(slice(None), *index[1:])]

        path = WeightName(LAYERS, ours).key
        return jax.make_array_from_callback(full, sharding_for(sharding, path, full), fill)

    def single(path, name, shape, transpose=False):
        w = get(name, shape)
        w = w.T if transpose else w
        if not (owned and w.dtype == dtype and w.flags.c_contiguous
                and w.ctypes.data % 64 == 0):
            host = host_buffer(w.shape, dtype)       # (already the buffer: placed as it is)
            host[...] = w
            w = host
        return place(w, path, sharding)

    params = {"embed": single("embed", names["embed"], (V, D)),
              "layers": {ours: stacked(ours, t) for ours, t in names["layers"].items()},
              "final_norm": single("final_norm", names["final_norm"], (D,))}
    if not cfg.tie_embeddings:
        params["lm_head"] = single("lm_head", names["lm_head"], (V, D), transpose=True)
    return params
