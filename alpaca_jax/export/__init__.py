"""Export: GGUF files for llama.cpp (F32, F16, Q8_0, Q4_0, Q4_1).

    from alpaca_jax.export import to_gguf
    to_gguf(params, cfg, tokenizer, "model-q8_0.gguf", qtype="Q8_0")
"""
from alpaca_jax.export.gguf_out import QTYPES, to_gguf

__all__ = ["to_gguf", "QTYPES"]
