"""Block shapes and ggml byte layouts shared by the format modules.

In JAX a tensor is quantized as `[..., n_blocks, block]` with blocks along the contracted axis
(moved last), so `[in, out]` kernels need no transpose. In a GGUF a block is a run of bytes
(scales first, then packed codes) and a row is its blocks end to end: `[..., n_blocks *
type_size]` uint8, what `gguf.quants.quantize` returns.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def to_blocks(x, axis: int, block: int | None):
    """Move `axis` last and split it into `[n/block, block]` (`block=None`: one block)."""
    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    if block is None:
        block = n
    if n % block:
        raise ValueError(f"the contracted dimension {n} is not a multiple of the block size "
                         f"{block}")
    return x.reshape(*x.shape[:-1], n // block, block)


def from_blocks(xb, axis: int, ndim: int):
    """Inverse of `to_blocks` for a tensor of rank `ndim`."""
    x = xb.reshape(*xb.shape[:-2], -1)
    return jnp.moveaxis(x, -1, axis % ndim)


def f16_bytes(a, lead: tuple) -> np.ndarray:
    """fp16 values `[*lead]` as their little-endian bytes `[*lead, 2]`."""
    return np.asarray(a, np.float16).reshape(*lead, 1).view(np.uint8)


def f16_from_bytes(b: np.ndarray) -> np.ndarray:
    """`[..., 2]` uint8 -> `[...]` float16 (inverse of `f16_bytes`)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout: byte j holds code j in its low nibble and code j + block/2 in its
    high nibble. `[..., block]` -> `[..., block/2]` uint8."""
    c = codes.astype(np.uint8)
    h = c.shape[-1] // 2
    return c[..., :h] | (c[..., h:] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_nibbles`: `[..., block/2]` uint8 -> `[..., block]` uint8 codes."""
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)


def rows_of_blocks(blocks: np.ndarray) -> np.ndarray:
    """`[..., n_blocks, type_size]` block bytes -> contiguous rows `[..., n_blocks * type_size]`."""
    return np.ascontiguousarray(blocks.reshape(*blocks.shape[:-2], -1))


def blocks_of_rows(raw: np.ndarray, type_size: int) -> np.ndarray:
    """Inverse of `rows_of_blocks`: `[..., row_bytes]` uint8 -> `[..., n_blocks, type_size]`."""
    raw = np.asarray(raw, np.uint8)
    if raw.shape[-1] % type_size:
        raise ValueError(f"a row of {raw.shape[-1]} bytes is not whole blocks of {type_size}")
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // type_size, type_size)


def pack_fifth_bits(codes: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's `qh`: bit 4 of code j as bit j of a little-endian uint32. `[..., 32]` ->
    `[..., 4]` uint8."""
    bits = ((codes.astype(np.uint32) >> 4) & 1) << np.arange(codes.shape[-1], dtype=np.uint32)
    qh = np.bitwise_or.reduce(bits, axis=-1).astype("<u4")
    return np.ascontiguousarray(qh)[..., None].view(np.uint8)


def unpack_fifth_bits(qh: np.ndarray, n: int = 32) -> np.ndarray:
    """Inverse of `pack_fifth_bits`: `[..., 4]` uint8 -> `[..., n]` uint8 holding 0 or 16."""
    word = np.ascontiguousarray(qh, np.uint8).view("<u4")          # [..., 1]
    return (((word >> np.arange(n, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
