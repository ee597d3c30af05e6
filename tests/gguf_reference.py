"""Write a tiny llama GGUF from a `transformers` model with the `gguf` package's own writer and
quantizers, the way llama.cpp's convert_hf_to_gguf.py does. Independent of alpaca_jax's code."""
from __future__ import annotations

import gguf
import numpy as np

from alpaca_jax.tokenizer.bpe import bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "e ll"]


def tiny_bpe_vocab():
    """259+5 pieces: three specials, the 256 byte characters, and one piece per merge."""
    pieces = SPECIALS + [bytes_to_unicode()[b] for b in range(256)]
    pieces += [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(pieces) - len(SPECIALS))
    return pieces, types


def hf_permute(weights, n_head, n_head_kv):
    # Copied from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute).
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    """What a weight becomes after quantization to `qtype` and dequantization."""
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def write_tiny_gguf(model, path, qtype=gguf.GGMLQuantizationType.F32):
    c = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    pieces, types = tiny_bpe_vocab()
    assert len(pieces) == c.vocab_size, (len(pieces), c.vocab_size)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(pieces)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                        "assistant\n{% endif %}")

    def add(name, arr):
        arr = np.ascontiguousarray(arr, np.float32)
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", hf_permute(sd[p + "self_attn.q_proj.weight"],
                                                 c.num_attention_heads, c.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", hf_permute(sd[p + "self_attn.k_proj.weight"],
                                                 c.num_attention_heads, c.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
