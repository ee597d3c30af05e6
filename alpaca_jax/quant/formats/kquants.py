"""GGML K-quants Q4_K, Q5_K, Q6_K: super-blocks of 256 with sub-block scales (and mins).

- Q6_K (210 bytes: ql[128], qh[64], int8 scales[16], fp16 d): 16 sub-blocks of 16, value
  `d * sc_j * (q - 32)`, q in [0, 63].
- Q4_K (144 bytes: fp16 d, dmin, 6-bit scales/mins packed in 12 bytes, qs[128]) and Q5_K (176
  bytes: the same plus qh[32]): 8 sub-blocks of 32, value `d * sc_j * q - dmin * m_j`, q in
  [0, 15] / [0, 31].

The quantizer is ggml's reference search, run on the host in numpy (`kquant_search.py` says
why), through `jax.pure_callback`, so it works under `jit` on any backend: fine for PTQ and
export, slow for QAT of large models (each step runs the search once per weight on the host;
the remat policies keep its codes for the backward, `costly_quantizer`). The
dequantizer is JAX and matches ggml's `dequantize_row_*` bit for bit: Q4_K/Q5_K's `d1 * q` is
exact in float32 (11 + 6 + 5 bits), so a fused multiply-add cannot change `d1 * q - m1`.

`in_range` is None (the straight-through gradient passes everywhere): each sub-block's grid is
fitted to its own values, so clipping is confined to the rounding of 6-bit sub-block scales.
"""
from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.quant.formats import kquant_search as ks
from alpaca_jax.quant.formats.base import GGMLFormat, Quantized, register_format


class _KQuant(GGMLFormat):
    block = ks.QK_K
    costly_quantizer = True

    def _host(self, x: np.ndarray) -> tuple:
        """numpy: the arrays `quantize_blocks` returns, for blocks `[..., n_blocks, 256]`."""
        raise NotImplementedError

    def _shapes(self, lead) -> tuple:
        raise NotImplementedError

    def quantize_blocks(self, xb) -> Quantized:
        lead = xb.shape[:-1]
        out = jax.pure_callback(self._host, self._shapes(lead), xb.astype(jnp.float32),
                                vmap_method="expand_dims")
        return self._quantized(*out)

    def fake_quant_activations(self, x):
        """Q8_K: llama.cpp's `vec_dot_type` for the K-quants."""
        from alpaca_jax.quant.formats.activations import q8k_activations
        return q8k_activations(x)


@register_format
class Q6_K(_KQuant):
    name = "q6_k"
    ggml_type = gguf.GGMLQuantizationType.Q6_K
    type_size = 210
    file_type = gguf.LlamaFileType.MOSTLY_Q6_K

    def _host(self, x):
        x = np.asarray(x, np.float32)
        d, sc, L = ks.quantize_q6_k(x.reshape(-1, 256))
        lead = x.shape[:-1]
        return L.reshape(*lead, 256), d.reshape(lead), sc.reshape(*lead, 16)

    def _shapes(self, lead):
        return (jax.ShapeDtypeStruct((*lead, 256), jnp.uint8),
                jax.ShapeDtypeStruct(lead, jnp.float16),
                jax.ShapeDtypeStruct((*lead, 16), jnp.int8))

    def _quantized(self, codes, d, sc):
        return Quantized(self.name, codes, d, None, {"sc": sc})

    def dequantize(self, q: Quantized):
        lead = q.codes.shape[:-1]
        dsc = q.d.astype(jnp.float32)[..., None] * q.extra["sc"].astype(jnp.float32)
        codes = (q.codes.astype(jnp.int16) - 32).astype(jnp.float32).reshape(*lead, 16, 16)
        return (dsc[..., None] * codes).reshape(*lead, 256)

    def pack(self, q: Quantized) -> np.ndarray:
        codes = np.asarray(q.codes)
        lead = codes.shape[:-1]
        return ks.pack_q6_k(np.asarray(q.d).reshape(-1), np.asarray(q.extra["sc"]).reshape(-1, 16),
                            codes.reshape(-1, 256)).reshape(*lead, self.type_size)

    def unpack(self, blocks: np.ndarray) -> Quantized:
        lead = blocks.shape[:-1]
        d, sc, L = ks.unpack_q6_k(blocks.reshape(-1, self.type_size))
        return self._quantized(L.reshape(*lead, 256), d.reshape(lead), sc.reshape(*lead, 16))


class _Q45K(_KQuant):
    """Q4_K and Q5_K: the same search and scale layout; `_pack` / `_unpack` differ."""

    def _host(self, x):
        x = np.asarray(x, np.float32)
        d, dmin, sc, m, L = ks.quantize_qx_k(x.reshape(-1, 256), self.name)
        lead = x.shape[:-1]
        return (L.reshape(*lead, 256), d.reshape(lead), dmin.reshape(lead),
                sc.reshape(*lead, 8), m.reshape(*lead, 8))

    def _shapes(self, lead):
        return (jax.ShapeDtypeStruct((*lead, 256), jnp.uint8),
                jax.ShapeDtypeStruct(lead, jnp.float16), jax.ShapeDtypeStruct(lead, jnp.float16),
                jax.ShapeDtypeStruct((*lead, 8), jnp.uint8),
                jax.ShapeDtypeStruct((*lead, 8), jnp.uint8))

    def _quantized(self, codes, d, dmin, sc, m):
        return Quantized(self.name, codes, d, dmin, {"sc": sc, "m": m})

    def dequantize(self, q: Quantized):
        lead = q.codes.shape[:-1]
        d1 = q.d.astype(jnp.float32)[..., None] * q.extra["sc"].astype(jnp.float32)
        m1 = q.m.astype(jnp.float32)[..., None] * q.extra["m"].astype(jnp.float32)
        codes = q.codes.astype(jnp.float32).reshape(*lead, 8, 32)
        return (d1[..., None] * codes - m1[..., None]).reshape(*lead, 256)

    def pack(self, q: Quantized) -> np.ndarray:
        codes = np.asarray(q.codes)
        lead = codes.shape[:-1]
        flat = lambda a, *s: np.asarray(a).reshape(-1, *s)  # noqa: E731
        return self._pack(flat(q.d), flat(q.m), flat(q.extra["sc"], 8),
                               flat(q.extra["m"], 8), flat(codes, 256)
                               ).reshape(*lead, self.type_size)

    def unpack(self, blocks: np.ndarray) -> Quantized:
        lead = blocks.shape[:-1]
        d, dmin, sc, m, L = self._unpack(blocks.reshape(-1, self.type_size))
        return self._quantized(L.reshape(*lead, 256), d.reshape(lead), dmin.reshape(lead),
                               sc.reshape(*lead, 8), m.reshape(*lead, 8))


@register_format
class Q4_K(_Q45K):
    name = "q4_k"
    ggml_type = gguf.GGMLQuantizationType.Q4_K
    type_size = 144
    file_type = gguf.LlamaFileType.MOSTLY_Q4_K_S
    _pack, _unpack = staticmethod(ks.pack_q4_k), staticmethod(ks.unpack_q4_k)


@register_format
class Q5_K(_Q45K):
    name = "q5_k"
    ggml_type = gguf.GGMLQuantizationType.Q5_K
    type_size = 176
    file_type = gguf.LlamaFileType.MOSTLY_Q5_K_S
    _pack, _unpack = staticmethod(ks.pack_q5_k), staticmethod(ks.unpack_q5_k)
