"""Quantization as a transform: PTQ (round-to-nearest, no training), the QAT `materialize`
transform, and `quantize_params` (the codes and scales export writes).

QAT over LoRA quantizes the effective weight, `W_eff = Q(W + s A B)` (or DoRA's), so merging the
trained adapter and quantizing gives exactly the weights the QAT forward used.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from alpaca_jax.config import ModelConfig
from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.params import LAYER_INDEX, WeightName
from alpaca_jax.model.transform import Transform, matmul
from alpaca_jax.peft.lora import merge
from alpaca_jax.quant.formats import Quantized, fake_quant, get_format, quantize
from alpaca_jax.quant.formats.ops import QUANT_CODES
from alpaca_jax.quant.spec import QuantSpec, block_axis, resolve


_KEEP_CODES = jax.checkpoint_policies.save_only_these_names(QUANT_CODES)


@dataclass(frozen=True)
class FakeQuant(Transform):
    """Fake-quantized weights (straight-through gradients) over an inner transform (adapters).
    `formats` is `resolve(spec, cfg)` as a tuple of (name, format) pairs, so the transform is
    hashable and can be a static argument of jitted functions.

    A quantized weight is formed whole, `Q(inner.weight(...))`, so adapter dropout (the `rng`
    of `linear`) does not reach adapters under a quantized weight; unquantized weights pass
    `rng` to the inner transform."""
    formats: tuple
    activations: bool = False
    inner: Transform = adapted
    # False: the weights are already on the grid (`ptq` applied once); only the activation
    # rounding is emulated. Evaluation and generation of a fixed quantized model use this, so
    # the quantizer (for the K-quants, a host-side search) does not run at every call.
    weights: bool = True

    @staticmethod
    def from_spec(spec: QuantSpec, cfg: ModelConfig) -> "FakeQuant":
        return FakeQuant(tuple(sorted(resolve(spec, cfg).items())), spec.activations)

    def _fmt(self, tree, name):
        return dict(self.formats).get(WeightName.parse(name).key)

    def weight(self, tree, name):
        w = self.inner.weight(tree, name)
        fmt = self._fmt(tree, name)
        if fmt is None or not self.weights:
            return w
        if isinstance(fmt, str):
            return fake_quant(w, fmt, axis=block_axis(name))
        # one format per layer (a llama.cpp K-quant mix)
        if w.ndim == 3:                                   # the stacked leaf: layer by layer
            return jnp.stack([fake_quant(w[i], f, axis=block_axis(name))
                              for i, f in enumerate(fmt)])
        return self._by_layer(tree, name, fmt, lambda f, w: fake_quant(w, f, block_axis(name)),
                              w)

    def _by_layer(self, tree, name, fmt: tuple, fn, *args):
        """`fn(format of this block, *args)` inside the layer scan, where the block's index is
        a traced value (`LAYER_INDEX`): a `lax.switch` over the mix's distinct formats."""
        if LAYER_INDEX not in tree:
            raise ValueError(f"{name} has a format per layer ({'/'.join(dict.fromkeys(fmt))}), "
                             "but this call gives no layer index (the forward's layer scan "
                             "does)")
        distinct = list(dict.fromkeys(fmt))
        branch = jnp.asarray([distinct.index(f) for f in fmt], jnp.int32)[tree[LAYER_INDEX]]
        return jax.lax.switch(branch, [lambda *a, f=f: fn(f, *a) for f in distinct], *args)

    def linear(self, x, tree, name, *, rng=None):
        fmt = self._fmt(tree, name)
        if fmt is None:
            return self.inner.linear(x, tree, name, rng=rng)
        # Rematerialised: the backward recomputes Q(W_eff) from the stored weight and adapters
        # instead of keeping one fake-quantized copy (and the quantizer's intermediates) per
        # layer alive from the forward; that made QAT + LoRA temporaries 3-4x LoRA's. A costly
        # quantizer's codes (the K-quants' host search) are the exception: kept, at a byte per
        # weight, so the search runs once per step and layer, not again in the backward (the
        # block remat policies keep them too, `model/remat.py`).
        return jax.checkpoint(self._quantized_linear, static_argnums=(2,),
                              policy=_KEEP_CODES)(x, tree, name)

    def _quantized_linear(self, x, tree, name):
        fmt = self._fmt(tree, name)
        w = self.weight(tree, name)
        if not self.activations:
            return matmul(x, w)
        # the product as llama.cpp's CPU backend forms it for this weight type (its rounding of
        # the inputs, and for Q4_1/Q5_1 the rounded block sums of Q8_1)
        if isinstance(fmt, str):
            return get_format(fmt).emulated_matmul(x, w, -2)
        return self._by_layer(tree, name, fmt,
                              lambda f, x, w: get_format(f).emulated_matmul(x, w, -2), x, w)

    def tied_head(self, h, params):
        fmt = self._fmt(params, "embed")
        if self.activations and fmt is not None:   # llama.cpp rounds the head's input too
            return get_format(fmt).emulated_matmul(h, self.weight(params, "embed"), -1)
        return super().tied_head(h, params)


# One jitted quantizer each: a fresh `jax.jit(lambda ...)` per weight (or per layer of a mix)
# would compile every time; these cache by shape, format and axis.
_fake_quant = jax.jit(fake_quant, static_argnums=(1, 2))
_quantize = jax.jit(quantize, static_argnums=(1, 2))


def _shape_cfg(params: dict, cfg):
    """What `resolve` needs, read from the params when no ModelConfig is given."""
    if cfg is not None:
        return cfg
    from types import SimpleNamespace
    lay = params["layers"]
    return SimpleNamespace(tie_embeddings="lm_head" not in params,
                           hidden_size=lay["wq"].shape[1], q_size=lay["wo"].shape[1],
                           intermediate_size=lay["w_down"].shape[1],
                           num_layers=lay["wq"].shape[0])


def _quantized_leaves(params: dict, spec: QuantSpec, cfg):
    """(key, weight, format) for every weight the spec quantizes (`layers/<kernel>`, `embed`,
    `lm_head`)."""
    for key, fmt in resolve(spec, _shape_cfg(params, cfg)).items():
        yield key, WeightName.parse(key).get(params), fmt


def ptq(params: dict, spec: QuantSpec, cfg: ModelConfig | None = None) -> dict:
    """Round-to-nearest post-training quantization: adapters merged, every quantized weight
    replaced by its dequantized value (the float model llama.cpp runs, up to activations)."""
    return _rounded(merge(params), resolve(spec, _shape_cfg(params, cfg)))


def fixed(params: dict, materialize):
    """`(params, materialize)` of the same model for evaluation: where `materialize` quantizes
    the weights with a costly quantizer (the K-quants' host search), the weights rounded once
    (adapters merged, as `ptq`) under `fixed_transform(materialize)`, so the search does not
    run again at every forward; otherwise unchanged (re-quantizing Q8_0/Q4_0 per forward costs
    little, and a rounded copy would hold a second set of weights). Bit for bit the weights
    the transform would form (`ptq`'s, `tests/test_file_types.py`)."""
    tr = fixed_transform(materialize)
    if tr is materialize:
        return params, materialize
    return _rounded(merge(params), dict(materialize.formats)), tr


def fixed_transform(materialize):
    """The transform `fixed` evaluates with: `materialize` without its weight quantizer (the
    activation rounding kept) where that quantizer is costly, else `materialize` itself."""
    if isinstance(materialize, FakeQuant) and materialize.weights and \
            materialize.inner is adapted and any(
                get_format(f).costly_quantizer for _, fmt in materialize.formats
                for f in ((fmt,) if isinstance(fmt, str) else fmt)):
        return dataclasses.replace(materialize, weights=False)
    return materialize


def _rounded(params: dict, formats: dict) -> dict:
    """`params` with each weight of `formats` ({key: format, or a format per layer}) replaced
    by its quantized value."""
    out = params
    for key, fmt in formats.items():
        w = WeightName.parse(key).get(params)
        if isinstance(fmt, str):
            deq = _fake_quant(w, fmt, block_axis(key))
        else:                                   # one format per layer
            deq = jnp.stack([_fake_quant(w[i], f, block_axis(key)) for i, f in enumerate(fmt)])
        out = WeightName.parse(key).put(out, deq)
    return out


def quantize_params(params: dict, spec: QuantSpec,
                    cfg: ModelConfig | None = None) -> dict[str, Quantized]:
    """`{name: Quantized}` for every quantized weight (adapters merged first). Blocks run along
    the contracted axis, laid out as ggml rows: layer kernels `[L, out, n_blocks, 32]`, the
    embedding `[V, n_blocks, 32]`, the head `[V, n_blocks, 32]`; scales `[..., n_blocks]`.
    A layer weight with one format per layer (a K-quant mix) gives a tuple of per-layer
    `Quantized` instead (each `[out, n_blocks, block]`)."""
    params = merge(params)
    out = {}
    for key, w, fmt in _quantized_leaves(params, spec, cfg):
        if isinstance(fmt, str):
            out[key] = _quantize(w, fmt, block_axis(key))
        else:
            out[key] = tuple(_quantize(w[i], f, block_axis(key)) for i, f in enumerate(fmt))
    return out
