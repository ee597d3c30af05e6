"""What a quantization format is, and the one registry every other module reads.

A format is one object: its exact quantizer and dequantizer (JAX, bit-exact with the deployment
runtime), the straight-through range, and, for a GGML tensor type, its GGUF type id, block size,
bytes per block, llama.cpp file type, byte packing both ways, and llama.cpp's choice of type for
the embedding and the output head. The exportable list (`GGML_TYPES`), export's `QTYPES`, GGUF
import's dequantization and `quant/spec.py`'s policy all read the registry, so a new format is
one module that subclasses `GGMLFormat` (or `Format`) and decorates it with `@register_format`,
plus its import line in `formats/__init__.py`.

Formats named by a pattern (`int4_g32`: any group size) register a family instead:
`register_family(pattern, make, describe)`.
"""
from __future__ import annotations

import abc
import functools
import re
from dataclasses import dataclass
from typing import Callable

import gguf
import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "d", "m", "extra"],
                   meta_fields=["fmt"])
@dataclass
class Quantized:
    """Integer codes and scales of one tensor, blocks along the last axis of `codes`
    (`[..., n_blocks, block]`): `d` (and `m` for Q4_1) `[..., n_blocks]`. For GGML types `d`/`m`
    are float16 and `codes` are ggml's stored values (Q8_0: int8; Q4_x: 0..15 as uint8).
    `extra` holds arrays a format needs beyond one scale and one offset per block (a K-quant's
    sub-block scales), keyed by the format's own names; None for the formats here."""
    fmt: str
    codes: jax.Array
    d: jax.Array
    m: jax.Array | None = None
    extra: dict | None = None


class Format(abc.ABC):
    """A weight quantization format. Subclasses set the class attributes and implement
    `quantize_blocks` and `dequantize`; the rest has defaults for a format that is not a GGUF
    tensor type (`ggml_type is None`: usable for PTQ/QAT ablations, not exportable).

    Instances compare and hash by class and name, so they can be static jit arguments."""
    name: str                    # canonical lower-case name, the registry key
    block: int | None            # values per scale along the contracted axis; None: the axis
    ggml_type: gguf.GGMLQuantizationType | None = None
    type_size: int | None = None         # bytes per block in a GGUF
    file_type: gguf.LlamaFileType | None = None   # `general.file_type` of a file of this type
    # True: quantizing is expensive (a host-side search), no value is clipped (`in_range` is
    # None), and QAT keeps the codes for the backward instead of quantizing again
    costly_quantizer: bool = False

    @property
    def ggml(self) -> bool:
        """Whether this is a GGUF tensor type (exportable)."""
        return self.ggml_type is not None

    @abc.abstractmethod
    def quantize_blocks(self, xb) -> Quantized:
        """Codes and scales of float32 blocks `[..., n_blocks, block]`."""

    @abc.abstractmethod
    def dequantize(self, q: Quantized) -> jax.Array:
        """float32 values `[..., n_blocks, block]` of `q`."""

    def in_range(self, xb):
        """Where the straight-through gradient passes (`xb` as given to the quantizer, before the
        float32 cast): a boolean array shaped like `xb`, or None when no value is clipped."""
        return None

    def fake_quant_activations(self, x):
        """The rounding llama.cpp applies to the activations entering a matmul with a weight of
        this format (its `vec_dot_type`). Default: 8-bit blocks of 32 (Q8_0/Q8_1)."""
        from alpaca_jax.quant.formats.activations import q8_activations
        return q8_activations(x)

    def emulated_matmul(self, x, w, contract: int):
        """`x @ w` as llama.cpp's CPU backend computes it for a weight `w` of this format,
        already on its grid (dequantized); `w`'s axis `contract` is the contracted one (`-2`
        for kernels `[in, out]`, `-1` for a tied embedding `[V, D]`). Default: the activations
        rounded by `fake_quant_activations`, then an ordinary product."""
        x = self.fake_quant_activations(x)
        if contract == -1:
            return jnp.einsum("...d,vd->...v", x, w.astype(x.dtype))
        from alpaca_jax.model.transform import matmul
        return matmul(x, w)

    def to_bytes(self, q: Quantized) -> np.ndarray:
        raise ValueError(f"{self.name} is not a GGML type; it has no GGUF byte layout")

    def from_bytes(self, raw: np.ndarray) -> Quantized:
        raise ValueError(f"{self.name} is not a GGML type; it has no GGUF byte layout")

    def default_head(self, row_len: int) -> str | None:
        """The format of the output head (or a tied embedding) when a model's block linears are
        in this format and the head is left to `auto`; None keeps it in float."""
        return None

    def default_embed(self, row_len: int, tied: bool) -> str | None:
        """The format of an untied token embedding under `auto` (tied: the head's)."""
        return self.default_head(row_len) if tied else None

    def __eq__(self, other):
        return type(self) is type(other) and self.name == other.name

    def __hash__(self):
        return hash((type(self).__name__, self.name))

    def __repr__(self):
        return f"<quant format {self.name}>"


class GGMLFormat(Format):
    """A GGUF tensor type. Subclasses give `pack` / `unpack` between `Quantized` and ggml's
    block bytes `[..., n_blocks, type_size]`; rows, reshapes and checks are done here.

    The tensor policy is llama.cpp's `llama_tensor_get_type` for a whole-file type (measured,
    `tests/test_quant.py::test_llama_cpp_tensor_types`): the embedding gets the file type, the
    head (or a tied embedding) Q6_K when its row length is a multiple of 256 and the file type
    is not Q8_0, Q8_0 otherwise."""
    ggml_type: gguf.GGMLQuantizationType
    type_size: int
    file_type: gguf.LlamaFileType

    @abc.abstractmethod
    def pack(self, q: Quantized) -> np.ndarray:
        """`[..., n_blocks, type_size]` uint8 block bytes of host arrays `q`."""

    @abc.abstractmethod
    def unpack(self, blocks: np.ndarray) -> Quantized:
        """Inverse of `pack`: codes `[..., n_blocks, block]` and scales from block bytes."""

    def to_bytes(self, q: Quantized) -> np.ndarray:
        """ggml rows `[..., n_blocks * type_size]` uint8: what `gguf.quants.quantize` returns
        and a GGUF stores."""
        from alpaca_jax.quant.formats.layout import rows_of_blocks
        return rows_of_blocks(self.pack(q))

    def from_bytes(self, raw: np.ndarray) -> Quantized:
        """`Quantized` (numpy arrays) of ggml rows `[..., row_bytes]` uint8."""
        from alpaca_jax.quant.formats.layout import blocks_of_rows
        return self.unpack(blocks_of_rows(raw, self.type_size))

    def default_head(self, row_len: int) -> str | None:
        if self.name != "q8_0" and row_len % 256 == 0 and "q6_k" in _FORMATS:
            return "q6_k"
        return "q8_0"

    def default_embed(self, row_len: int, tied: bool) -> str | None:
        return self.default_head(row_len) if tied else self.name


# ---------------------------------------------------------------------------------- registry

_FORMATS: dict[str, Format] = {}
_FAMILIES: list[tuple[re.Pattern, Callable[[re.Match], Format], str]] = []


def register_format(cls):
    """Class decorator: register one instance of a `Format` subclass under its `name`. Checks
    what can be checked at import: a unique lower-case name, and for a GGML type a unique type
    id whose block size and bytes per block are the `gguf` package's."""
    fmt = cls() if isinstance(cls, type) else cls
    name = fmt.name
    if name != name.lower() or name in _FORMATS:
        raise ValueError(f"quant format {name!r}: names are lower-case and unique "
                         f"(registered: {', '.join(_FORMATS)})")
    if fmt.ggml_type is not None:
        sizes = gguf.GGML_QUANT_SIZES[fmt.ggml_type]
        if (fmt.block, fmt.type_size) != sizes:
            raise ValueError(f"quant format {name!r}: block {fmt.block} / {fmt.type_size} bytes "
                             f"differ from ggml's {fmt.ggml_type.name} {sizes}")
        for other in _FORMATS.values():
            if other.ggml_type == fmt.ggml_type:
                raise ValueError(f"quant formats {other.name!r} and {name!r} both claim "
                                 f"{fmt.ggml_type.name}")
    _FORMATS[name] = fmt
    return cls


def register_family(pattern: str, make: Callable[[re.Match], Format], describe: str) -> None:
    """Formats named by a pattern: `make(match)` builds one (or raises ValueError);
    `describe` is how the error for an unknown name lists them."""
    _FAMILIES.append((re.compile(pattern), make, describe))


def get_format(name: str | Format) -> Format:
    """The format called `name` (case-insensitive; a `Format` is returned as is), or a
    ValueError listing the registered names."""
    if isinstance(name, Format):
        return name
    key = str(name).lower()
    if key in _FORMATS:
        return _FORMATS[key]
    for pattern, make, _ in _FAMILIES:
        m = pattern.fullmatch(key)
        if m:
            return make(m)
    valid = list(_FORMATS) + [d for _, _, d in _FAMILIES]
    raise ValueError(f"unknown quant format {name!r}; valid: {', '.join(valid)}")


def registered_formats() -> tuple[str, ...]:
    """Every format registered by name, in registration order (families not included)."""
    return tuple(_FORMATS)


def exportable_formats() -> tuple[str, ...]:
    """The formats a GGUF can hold (lower-case names): what export and the stage pipeline
    accept as a quantized model's format."""
    return tuple(n for n, f in _FORMATS.items() if f.ggml_type is not None)


def format_for_ggml_type(t: gguf.GGMLQuantizationType) -> GGMLFormat | None:
    """The registered format of a GGUF tensor type, None when there is none."""
    for f in _FORMATS.values():
        if f.ggml_type == t:
            return f
    return None
