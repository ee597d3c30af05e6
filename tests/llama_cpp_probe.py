"""Read llama.cpp's intermediate tensors during an eval (ggml's scheduler eval callback, as
llama.cpp's own `eval-callback` tool does), so a test can feed our quantized matmul exactly the
input llama.cpp's matmul saw and compare the outputs.

The ctypes layout is `struct ggml_tensor` of the ggml vendored by llama-cpp-python 0.3.36 (the
pinned version); a layout change shows up as missing tensor names, which the tests check.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np


class _GgmlTensor(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int),
                ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
                ("padding", ctypes.c_char * 8)]


GGML_TYPE_F32 = 0
GGML_OP_MUL_MAT = 29


def _read_f32(t: _GgmlTensor) -> np.ndarray:
    """A contiguous F32 tensor as numpy `[ne3, ne2, ne1, ne0]`, squeezed (a copy)."""
    ne, nb = list(t.ne), list(t.nb)
    if nb != [4, 4 * ne[0], 4 * ne[0] * ne[1], 4 * ne[0] * ne[1] * ne[2]]:
        raise ValueError(f"{t.name.decode()}: not a contiguous tensor (nb={nb})")
    n = ne[0] * ne[1] * ne[2] * ne[3]
    flat = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), (n,))
    return np.array(flat).reshape(ne[::-1]).squeeze()


def capture(model_path: str, ids: list[int], names: set[str], threads: int = 2) -> dict:
    """Evaluate `ids` (one prompt pass, F32 KV cache) and return {name: array} for the F32
    tensors whose ggml name is in `names`. For a name computed several times (`Qcur-0` is the
    matmul, then a reshape, then RoPE) the first, which for `Qcur`/`Kcur`/`Vcur` is the
    matmul's output."""
    import llama_cpp.llama_cpp as lib

    from alpaca_jax.export.runtime import open_llama

    got: dict = {}

    @lib.ggml_backend_sched_eval_callback
    def callback(ptr, ask, _user):
        t = ctypes.cast(ptr, ctypes.POINTER(_GgmlTensor)).contents
        name = t.name.decode(errors="replace")
        if ask:
            return name in names
        if name not in got and t.type == GGML_TYPE_F32 and t.data:
            got[name] = _read_f32(t)
        return True

    default = lib.llama_context_default_params

    def with_callback():
        p = default()
        p.cb_eval, p.cb_eval_user_data = callback, None
        return p

    lib.llama_context_default_params = with_callback   # Llama() reads it at construction
    try:
        llm = open_llama(model_path, repack=False, n_ctx=max(32, len(ids)), n_batch=len(ids),
                         n_threads=threads, type_k=0, type_v=0)
        llm.eval(list(ids))
    finally:
        lib.llama_context_default_params = default
    return got


def matmul_pairs(cfg) -> list[tuple]:
    """(llama.cpp input name, output name, our kernel, heads to un-permute or None) per block,
    then the output head."""
    out = []
    for i in range(cfg.num_layers):
        out += [(f"attn_norm-{i}", f"Qcur-{i}", "wq", cfg.num_heads),
                (f"attn_norm-{i}", f"Kcur-{i}", "wk", cfg.num_kv_heads),
                (f"attn_norm-{i}", f"Vcur-{i}", "wv", None),
                (f"kqv_out-{i}", f"attn_out-{i}", "wo", None),
                (f"ffn_norm-{i}", f"ffn_gate-{i}", "w_gate", None),
                (f"ffn_norm-{i}", f"ffn_up-{i}", "w_up", None),
                (f"ffn_swiglu-{i}", f"ffn_out-{i}", "w_down", None)]
    return out + [("result_norm", "result_output", "head", None)]


def matmul_errors(path, params, cfg, qtype: str, ids: list[int]) -> dict[str, float]:
    """Every quantized matmul of the GGUF at `path` (our `qtype` export of `params`): our
    emulated product (`FakeQuant(activations=True)`) on the input llama.cpp's matmul saw,
    against llama.cpp's output; `{output name: max |diff| / max(1, max |theirs|)}`."""
    import jax

    from alpaca_jax.io.gguf_in import permute_rope
    from alpaca_jax.model.params import LAYER_INDEX
    from alpaca_jax.quant import FakeQuant, QuantSpec

    mm = matmul_pairs(cfg)
    got = capture(path, ids, {n for pair in mm for n in pair[:2]})
    missing = sorted({n for pair in mm for n in pair[:2]} - set(got))
    if missing:
        raise AssertionError(f"llama.cpp tensors not captured: {missing[:5]}")
    fq = FakeQuant.from_spec(QuantSpec(qtype.lower(), activations=True), cfg)

    # compiled once per kernel, the block index traced (as in the forward's layer scan); run op
    # by op instead, each kernel's first call compiled ~55 small programs
    @functools.partial(jax.jit, static_argnums=2)
    def block_linear(x, layers, kernel, i):
        return fq.linear(x, {**jax.tree.map(lambda a: a[i], layers), LAYER_INDEX: i}, kernel)

    errors = {}
    for src, dst, kernel, heads in mm:
        x = got[src]
        if kernel == "head":
            ours = np.asarray(fq.linear(x, params, "lm_head") if "lm_head" in params
                              else fq.tied_head(x[None], params)[0])
        else:
            i = np.int32(dst.rsplit("-", 1)[1])
            ours = np.asarray(block_linear(x, params["layers"], kernel, i))
        if heads is not None:                    # llama.cpp's q/k rows are RoPE-permuted
            ours = permute_rope(ours.T, heads).T
        ref = got[dst]
        errors[dst] = float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))
    return errors
