"""ggml's K-quant reference quantizers (Q4_K, Q5_K, Q6_K), in numpy float32, bit for bit.

Why our own: the `gguf` package dequantizes K-quants but cannot quantize them, and llama.cpp's
C code is not callable from a JAX program. The K-quants pick each sub-block's scale (and min)
by a small search (`make_qx_quants` for Q6_K, `make_qkx2_quants` for Q4_K/Q5_K in ggml's
`ggml-quants.c`) that compares float32 sums accumulated in order; a sum rounded differently
flips the choice. So this module is numpy, not JAX: numpy rounds every float32 operation as
written and never fuses a multiply-add, which is what ggml's reference build (`ggml-base`,
compiled without FMA flags) does. XLA:CPU contracts `a * b + c` into FMAs and reorders
reductions (`numerics.py`), so a JAX port would drift. The formats call this on the host
(`jax.pure_callback`); `tests/test_kquants.py` checks it byte for byte against
`ggml_quantize_chunk` in the `libggml-base` llama-cpp-python ships.

Every sum over the elements of a sub-block is accumulated in ggml's order (`seq_sum`),
vectorised across sub-blocks. Shapes: super-blocks `[N, 256]` float32.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: add 1.5 * 2^23 in float32 and read the low mantissa bits (round
    half to even for |f| <= 2^22 - 1, ggml's asserted range)."""
    v = (np.asarray(f, F32) + F32(12582912.0)).astype(F32)
    i = v.view(np.int32)
    return (i & 0x007FFFFF) - 0x00400000


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """Row sums of `[M, n]` float32 terms added left to right, each partial sum rounded to
    float32, as a C loop `s += t[i]` from s = 0 does: `np.add.accumulate` is that loop
    (`np.sum` adds pairwise, a different rounding)."""
    return np.add.accumulate(np.ascontiguousarray(terms, F32), axis=1, dtype=F32)[:, -1]


def _f16(x):
    """GGML_FP32_TO_FP16 then back: round to nearest even, as float32."""
    return np.asarray(x, F32).astype(np.float16).astype(F32)


# ------------------------------------------------------------------------------------ Q6_K

def make_qx_quants(x: np.ndarray, nmax: int):
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)` over rows of `x` `[M, n]`:
    (scale `[M]` float32, L `[M, n]` int32 in [0, 2 nmax))."""
    M, n = x.shape
    ax = np.abs(x)
    imax = np.argmax(ax, axis=1)                       # the first of equal |x|, as ggml's `>`
    amax = ax[np.arange(M), imax]
    mx = x[np.arange(M), imax]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx).astype(F32)
    w = (x * x).astype(F32)
    wx = (w * x).astype(F32)

    def sums(iscale):
        ls = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = ls.astype(F32)
        return ls, seq_sum(wx * lf), seq_sum((w * lf) * lf)

    with np.errstate(divide="ignore", invalid="ignore"):
        L, sumlx, suml2 = sums((F32(-nmax) / mx).astype(F32))
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = (scale * sumlx).astype(F32)
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / mx).astype(F32)
            ls, sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & ((sumlx * sumlx).astype(F32) > (best * suml2).astype(F32))
            L = np.where(better[:, None], ls, L)
            new_scale = np.where(better, sumlx / np.where(better, suml2, F32(1)), scale)
            scale = new_scale.astype(F32)
            best = np.where(better, scale * sumlx, best).astype(F32)
    L = np.where(zero[:, None], 0, L + nmax)
    return np.where(zero, F32(0), scale).astype(F32), L


CHUNK = 1024   # super-blocks per pass: each pass's [rows, 32] temporaries stay in cache


def _chunked(fn):
    """Run `fn` over `[N, 256]` super-blocks CHUNK at a time (rows are independent) and join
    the results, so the temporaries of the searches stay cache-sized."""
    def run(x, *args):
        x = np.ascontiguousarray(x, F32)
        if x.shape[0] <= CHUNK:
            return fn(x, *args)
        parts = [fn(x[i:i + CHUNK], *args) for i in range(0, x.shape[0], CHUNK)]
        return tuple(np.concatenate(p) for p in zip(*parts))
    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    return run


@_chunked
def quantize_q6_k(x: np.ndarray):
    """`quantize_row_q6_K_ref` over super-blocks `[N, 256]`: (d `[N]` float16, scales `[N, 16]`
    int8, L `[N, 256]` uint8 in [0, 63])."""
    x = np.ascontiguousarray(x, F32)
    N = x.shape[0]
    sub = x.reshape(N * 16, 16)
    scales, L = make_qx_quants(sub, 32)
    scales, L = scales.reshape(N, 16), L.reshape(N, 16, 16)
    a = np.abs(scales)
    imax = np.argmax(a, axis=1)
    max_abs = a[np.arange(N), imax]
    max_scale = scales[np.arange(N), imax]
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (F32(-128.0) / np.where(zero, F32(1), max_scale)).astype(F32)
        d = (F32(1) / iscale).astype(np.float16)
        sc = np.minimum(127, nearest_int(iscale[:, None] * scales))
        sc = sc.astype(np.int8)                      # stored as int8 (C's implicit conversion)
        dj = (d.astype(F32)[:, None] * sc.astype(F32)).astype(F32)       # [N, 16]
        q = nearest_int((x.reshape(N, 16, 16) / np.where(dj == 0, F32(1), dj)[..., None]
                         ).astype(F32))
    q = np.clip(q, -32, 31) + 32
    L = np.where((dj == 0)[..., None], L, q)                            # ggml's `continue`
    d = np.where(zero, np.float16(0), d)
    sc = np.where(zero[:, None], np.int8(0), sc)
    L = np.where(zero[:, None, None], 0, L)
    return d, sc, L.reshape(N, 256).astype(np.uint8)


def pack_q6_k(d, sc, L) -> np.ndarray:
    """block_q6_K bytes `[N, 210]`: ql[128], qh[64], scales[16], d."""
    N = L.shape[0]
    L = L.reshape(N, 2, 4, 32).astype(np.uint8)      # [half, quarter, l]
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2)  # [N, 2, 64]
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6))                                             # [N, 2, 32]
    return np.concatenate([ql.reshape(N, 128), qh.reshape(N, 64),
                           np.asarray(sc, np.int8).view(np.uint8).reshape(N, 16),
                           np.asarray(d, np.float16).reshape(N, 1).view(np.uint8)], axis=1)


def unpack_q6_k(blocks: np.ndarray):
    """Inverse of `pack_q6_k`: (d `[N]` float16, scales `[N, 16]` int8, L `[N, 256]` uint8)."""
    b = np.asarray(blocks, np.uint8)
    N = b.shape[0]
    ql = b[:, :128].reshape(N, 2, 2, 32)
    qh = b[:, 128:192].reshape(N, 2, 32)
    lo = [ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4]
    L = np.stack([lo[k] | (((qh >> (2 * k)) & 3) << 4) for k in range(4)], axis=2)
    sc = b[:, 192:208].copy().view(np.int8)
    d = np.ascontiguousarray(b[:, 208:210]).view(np.float16)[:, 0]
    return d, sc, L.reshape(N, 256).astype(np.uint8)


# ------------------------------------------------------------------------------ Q4_K, Q5_K

def make_qkx2_quants(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int):
    """`make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep,
    use_mad=false)` over rows `[M, n]`: (scale `[M]`, the_min `[M]` (>= 0), L `[M, n]`)."""
    M, n = x.shape
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    sum_w = seq_sum(weights)
    sum_x = seq_sum(weights * x)
    mn = np.where(mn > 0, F32(0), mn).astype(F32)
    flat = mx == mn
    mn_flat = mn.copy()

    def span(mn):   # `max - min` with the current min (ggml's search moves min as it goes)
        return np.where(flat, F32(1), (mx - mn).astype(F32)).astype(F32)

    def error(scale, the_min, L):
        diff = ((scale[:, None] * L.astype(F32)) + the_min[:, None]) - x
        return seq_sum(weights * (diff * diff))

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (F32(nmax) / span(mn)).astype(F32)
        scale = (F32(1) / iscale).astype(F32)
        L = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None]).astype(F32)), 0, nmax)
        best = error(scale, mn, L)
        for step in range(nstep + 1):
            iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span(mn)
                      ).astype(F32)
            Laux = np.clip(nearest_int(iscale[:, None] * (x - mn[:, None]).astype(F32)),
                           0, nmax)
            lf = Laux.astype(F32)
            wl = weights * lf
            sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * lf), seq_sum(wl * x)
            D = ((sum_w * sum_l2).astype(F32) - (sum_l * sum_l).astype(F32)).astype(F32)
            ok = D > 0
            Ds = np.where(ok, D, F32(1))
            this_scale = (((sum_w * sum_xl).astype(F32) - (sum_x * sum_l).astype(F32))
                          / Ds).astype(F32)
            this_min = (((sum_l2 * sum_x).astype(F32) - (sum_l * sum_xl).astype(F32))
                        / Ds).astype(F32)
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / np.where(pos, sum_l2, F32(1)),
                                  this_scale).astype(F32)
            this_min = np.where(pos, F32(0), this_min).astype(F32)
            cur = error(this_scale, this_min, Laux)
            better = ok & (cur < best) & ~flat
            L = np.where(better[:, None], Laux, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale).astype(F32)
            mn = np.where(better, this_min, mn).astype(F32)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, F32(0), scale).astype(F32)
    mn = np.where(flat, mn_flat, mn)
    return scale, (-mn).astype(F32), L


_KX2 = {"q4_k": (15, -1.0, 0.1, 20), "q5_k": (31, -0.5, 0.1, 15)}


@_chunked
def quantize_qx_k(x: np.ndarray, fmt: str):
    """`quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` over super-blocks `[N, 256]`:
    (d `[N]` float16, dmin `[N]` float16, sc `[N, 8]` uint8, m `[N, 8]` uint8 (6-bit), L
    `[N, 256]` uint8 in [0, nmax])."""
    nmax, rmin, rdelta, nstep = _KX2[fmt]
    x = np.ascontiguousarray(x, F32)
    N = x.shape[0]
    sub = x.reshape(N * 8, 32)
    sum_x2 = seq_sum(sub * sub)
    av_x = np.sqrt((sum_x2 / F32(32)).astype(F32)).astype(F32)
    weights = (av_x[:, None] + np.abs(sub)).astype(F32)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.reshape(N, 8), mins.reshape(N, 8), L.reshape(N, 8, 32)
    max_scale = np.zeros(N, F32)
    max_min = np.zeros(N, F32)
    for j in range(8):   # strict `>` from 0, in order (scales can be negative or NaN-free)
        max_scale = np.where(scales[:, j] > max_scale, scales[:, j], max_scale)
        max_min = np.where(mins[:, j] > max_min, mins[:, j], max_min)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales).astype(np.uint8), 63)
        lm = np.minimum(nearest_int(inv_min[:, None] * mins).astype(np.uint8), 63)
        d = (max_scale / F32(63)).astype(F32).astype(np.float16)
        dmin = (max_min / F32(63)).astype(F32).astype(np.float16)
        dj = (d.astype(F32)[:, None] * ls.astype(F32)).astype(F32)
        dm = (dmin.astype(F32)[:, None] * lm.astype(F32)).astype(F32)
        q = nearest_int(((x.reshape(N, 8, 32) + dm[..., None]).astype(F32)
                         / np.where(dj == 0, F32(1), dj)[..., None]).astype(F32))
    q = np.clip(q, 0, nmax)
    L = np.where((dj == 0)[..., None], L, q)                            # ggml's `continue`
    return d, dmin, ls, lm, L.reshape(N, 256).astype(np.uint8)


def pack_scales_k4(ls, lm) -> np.ndarray:
    """The 12-byte 6-bit scale/min layout of Q4_K/Q5_K (`get_scale_min_k4`'s inverse)."""
    N = ls.shape[0]
    s = np.zeros((N, 12), np.uint8)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return s


def unpack_scales_k4(s: np.ndarray):
    """`get_scale_min_k4` for j = 0..7: (sc `[N, 8]`, m `[N, 8]`) uint8."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.uint8), m.astype(np.uint8)


def _halves(a):
    return np.asarray(a, np.float16).reshape(-1, 1).view(np.uint8)


def pack_q4_k(d, dmin, ls, lm, L) -> np.ndarray:
    """block_q4_K bytes `[N, 144]`: d, dmin, scales[12], qs[128]."""
    N = L.shape[0]
    L = L.reshape(N, 4, 2, 32).astype(np.uint8)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(N, 128)
    return np.concatenate([_halves(d), _halves(dmin), pack_scales_k4(ls, lm), qs], axis=1)


def _unpack_head_k4(b: np.ndarray):
    """d, dmin, sc, m: the 16 leading bytes Q4_K and Q5_K blocks share."""
    d = np.ascontiguousarray(b[:, 0:2]).view(np.float16)[:, 0]
    dmin = np.ascontiguousarray(b[:, 2:4]).view(np.float16)[:, 0]
    return (d, dmin, *unpack_scales_k4(b[:, 4:16]))


def unpack_q4_k(b: np.ndarray):
    b = np.asarray(b, np.uint8)
    N = b.shape[0]
    d, dmin, sc, m = _unpack_head_k4(b)
    qs = b[:, 16:144].reshape(N, 4, 32)
    L = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(N, 256)
    return d, dmin, sc, m, L.astype(np.uint8)


def pack_q5_k(d, dmin, ls, lm, L) -> np.ndarray:
    """block_q5_K bytes `[N, 176]`: d, dmin, scales[12], qh[32], qs[128]."""
    N = L.shape[0]
    L = L.reshape(N, 4, 2, 32).astype(np.uint8)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(N, 128)
    qh = np.zeros((N, 32), np.uint8)
    for k in range(4):
        qh |= ((L[:, k, 0] >> 4) & 1) << (2 * k)
        qh |= ((L[:, k, 1] >> 4) & 1) << (2 * k + 1)
    return np.concatenate([_halves(d), _halves(dmin), pack_scales_k4(ls, lm), qh, qs], axis=1)


def unpack_q5_k(b: np.ndarray):
    b = np.asarray(b, np.uint8)
    N = b.shape[0]
    d, dmin, sc, m = _unpack_head_k4(b)
    qh = b[:, 16:48]
    qs = b[:, 48:176].reshape(N, 4, 32)
    L = np.stack([np.stack([(qs[:, k] & 0xF) | (((qh >> (2 * k)) & 1) << 4),
                            (qs[:, k] >> 4) | (((qh >> (2 * k + 1)) & 1) << 4)], axis=1)
                  for k in range(4)], axis=1)
    return d, dmin, sc, m, L.reshape(N, 256).astype(np.uint8)
