"""The format registry (`alpaca_jax/quant/formats/`): every registered GGML format round-trips
through ggml's bytes as the `gguf` package reads them, imports what the `gguf` package would,
and everything that lists formats is derived from the registry. A new format is covered here by
registering it; its bit-exactness on hard cases is `tests/test_quant.py`'s parametrization."""
from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax.quant import QuantSpec, resolve
from alpaca_jax.quant.formats import (GGML_TYPES, Format, GGMLFormat, dequantize_blocks,
                                      exportable_formats, format_for_ggml_type, from_ggml_bytes,
                                      get_format, quantize, register_format, registered_formats,
                                      to_ggml_bytes)

EXPORTABLE = exportable_formats()


def test_the_registry_lists_the_built_in_formats():
    assert EXPORTABLE == GGML_TYPES and EXPORTABLE[:3] == ("q8_0", "q4_0", "q4_1")
    assert set(EXPORTABLE) <= set(registered_formats())


@pytest.mark.parametrize("name", EXPORTABLE)
def test_quantize_to_bytes_is_what_gguf_dequantizes(name):
    """quantize -> to_ggml_bytes -> gguf.quants.dequantize equals our dequantize, bit for bit;
    and from_ggml_bytes gives back the codes and scales."""
    fmt = get_format(name)
    assert isinstance(fmt, GGMLFormat) and fmt.ggml
    assert (fmt.block, fmt.type_size) == gguf.GGML_QUANT_SIZES[fmt.ggml_type]
    assert isinstance(fmt.file_type, gguf.LlamaFileType)
    assert format_for_ggml_type(fmt.ggml_type) is fmt
    rng = np.random.default_rng(0)
    w = (rng.standard_t(3, (8 * fmt.block, 24)) * 0.05).astype(np.float32)   # [in, out]
    q = quantize(w, name, axis=0)                                   # [out, n_blocks, block]
    raw = to_ggml_bytes(q)
    assert raw.shape == (24, 8 * fmt.type_size) and raw.dtype == np.uint8
    ours = np.asarray(dequantize_blocks(q)).reshape(24, -1)
    theirs = gguf.quants.dequantize(raw, fmt.ggml_type)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    back = from_ggml_bytes(raw, name)
    for field in ("codes", "d", "m", "extra"):
        a, b = getattr(q, field), getattr(back, field)
        assert (a is None) == (b is None), field
        if a is not None and field != "extra":
            assert np.array_equal(np.asarray(a), np.asarray(b)), field
    assert np.array_equal(to_ggml_bytes(back), raw)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_import_of_any_bytes_is_what_gguf_dequantizes(name):
    """GGUF import's path (`from_bytes` then `dequantize`, with numpy or JAX arrays) on blocks
    no quantizer of ours wrote: random bytes, so scales of every fp16 value, inf and NaN
    included."""
    fmt = get_format(name)
    raw = np.random.default_rng(1).integers(0, 256, (16, 4 * fmt.type_size), np.uint8)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.dequantize(raw, fmt.ggml_type)
        host = np.asarray(fmt.dequantize(fmt.from_bytes(raw))).reshape(16, -1)
    dev = np.asarray(fmt.dequantize(jax.tree_util.tree_map(jnp.asarray, fmt.from_bytes(raw))))
    np.testing.assert_array_equal(host, theirs)
    np.testing.assert_array_equal(dev.reshape(16, -1), theirs)


def test_unknown_format_lists_the_registered_names():
    with pytest.raises(ValueError, match="unknown quant format 'q3_x'") as e:
        get_format("q3_x")
    for name in registered_formats():
        assert name in str(e.value)
    assert "int4_g<N>" in str(e.value)      # the families too


def test_generic_formats_are_not_exportable():
    for name in ("int8_channel", "int4_g32", "INT8_G16"):
        fmt = get_format(name)
        assert fmt.ggml_type is None and not fmt.ggml and fmt.name == name.lower()
        assert fmt.name not in EXPORTABLE
        with pytest.raises(ValueError, match="is not a GGML type"):
            to_ggml_bytes(quantize(np.ones((32, 2), np.float32), fmt))
    assert get_format("int4_g32") == get_format("int4_g32")   # a static jit argument
    with pytest.raises(ValueError, match="group size must be >= 1"):
        get_format("int4_g0")


def test_everything_that_lists_formats_reads_the_registry():
    from alpaca_jax.export import QTYPES
    from alpaca_jax.io.gguf_in import supported_types

    upper = tuple(n.upper() for n in EXPORTABLE)
    from alpaca_jax.quant.file_types import FILE_TYPES
    assert QTYPES == ("F32", "F16") + upper + tuple(f.upper() for f in FILE_TYPES)
    assert supported_types() == ("F32", "F16", "BF16") + upper
    from alpaca_jax.config import ModelConfig
    cfg = ModelConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=64)
    for name in EXPORTABLE:
        assert resolve(QuantSpec(name), cfg)["layers/wq"] == name


def test_registration_refuses_a_taken_name_and_wrong_block_sizes():
    q8 = type(get_format("q8_0"))
    with pytest.raises(ValueError, match="lower-case and unique"):
        register_format(type("Again", (q8,), {}))
    with pytest.raises(ValueError, match="differ from ggml's Q5_0"):
        register_format(type("BadQ5", (q8,), {"name": "bad_q5", "ggml_type":
                                               gguf.GGMLQuantizationType.Q5_0}))
    with pytest.raises(ValueError, match="both claim Q8_0"):
        register_format(type("Twin", (q8,), {"name": "twin_q8"}))
    assert "bad_q5" not in registered_formats() and "twin_q8" not in registered_formats()
    assert issubclass(q8, Format)
