"""ggml's own quantizers, called in the `libggml-base` that llama-cpp-python ships, as the
reference for byte-exactness tests: `ggml_quantize_chunk` is the function `llama-quantize` calls
for every tensor (without an importance matrix it runs the `quantize_row_*_ref` C code)."""
from __future__ import annotations

import ctypes
import glob
import os

import gguf
import numpy as np


def _lib():
    import llama_cpp
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    path = sorted(glob.glob(os.path.join(libdir, "libggml-base.so*")))[0]
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return lib


_LIB = None


def ggml_quantize(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """ggml's bytes of the float32 rows `x` `[rows, n_per_row]`: `[rows, row_bytes]` uint8."""
    global _LIB
    if _LIB is None:
        _LIB = _lib()
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, n // block * type_size), np.uint8)
    written = _LIB.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                       None)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def ggml_cpu_q8_k(x: np.ndarray) -> np.ndarray:
    """The values llama.cpp's CPU backend rounds K-quant matmul inputs to: `quantize_row_q8_K`
    of `libggml-cpu` (its SIMD build, what the runtime calls) on float32 rows `[rows, n]`,
    dequantized (`d * q`, float32 `d`)."""
    import llama_cpp
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    ctypes.CDLL(sorted(glob.glob(os.path.join(libdir, "libggml-base.so*")))[0],
                mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(sorted(glob.glob(os.path.join(libdir, "libggml-cpu.so*")))[0])
    cpu.quantize_row_q8_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    block = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
    out = np.zeros((rows, n // 256), block)
    for r in range(rows):
        cpu.quantize_row_q8_K(x[r].ctypes.data, out[r].ctypes.data, n)
    return (out["d"][..., None] * out["qs"].astype(np.float32)).reshape(rows, n)
