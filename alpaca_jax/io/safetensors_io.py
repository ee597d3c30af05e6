"""safetensors read and written one tensor at a time.

Reading uses plain positioned reads, not a memory map (`safe_open` maps the file): mapped pages
that have been read count in the process's resident memory until the map is closed, so reading
a whole checkpoint through maps shows up as a second copy of it. Writing computes the header
from shapes and dtypes first, then appends each tensor's bytes as it is produced, so a shard is
never assembled in memory. The format is the documented one: an 8-byte little-endian header
length, a JSON header (`dtype`, `shape`, `data_offsets` per name, optional `__metadata__`), the
data.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from alpaca_jax.io.layout import host_buffer

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_HEADER = 100 << 20


class SafetensorsFile:
    """The header of one file and `read(name)` of one tensor (a fresh numpy array)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if not 0 < n <= _MAX_HEADER:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
            self.data_start = 8 + n
            self.meta = header.pop("__metadata__", None) or {}
            size = self.path.stat().st_size - self.data_start
            for name, h in header.items():
                start, end = h["data_offsets"]
                want = int(np.prod(h["shape"], dtype=np.int64)) * np.dtype(
                    DTYPES[h["dtype"]]).itemsize
                if end - start != want or end > size:
                    raise ValueError(f"tensor {name!r} has {end - start} bytes at {start}:{end}, "
                                     f"expected {want} within the file's {size} data bytes")
        except (OSError, ValueError, KeyError, TypeError, struct.error,
                json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: cannot read safetensors file ({e})") from e
        self.header = header

    def dtype_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.header.values():
            start, end = h["data_offsets"]
            out[h["dtype"]] = out.get(h["dtype"], 0) + end - start
        return out

    def read(self, name: str) -> np.ndarray:
        h = self.header[name]
        start, end = h["data_offsets"]
        out = host_buffer(h["shape"], DTYPES[h["dtype"]])     # aligned: placed without a copy
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - start:
                raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        return out


def write_streaming(path, specs: Iterable[tuple[str, tuple, np.dtype]],
                    produce: Callable[[str], np.ndarray], metadata: dict | None = None) -> int:
    """Write `path` from `(name, shape, dtype)` specs, calling `produce(name)` for each tensor's
    data only when its turn comes; returns the data bytes written."""
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)          # the data starts 8-byte aligned, as the spec asks
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} came out {arr.shape}, expected {shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    return offset
