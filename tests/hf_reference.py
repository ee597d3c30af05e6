"""Tiny random `transformers` LLaMA models built in-process: the parity reference."""
from __future__ import annotations

import numpy as np
import torch
import transformers

from alpaca_jax.io.hf import config_from_hf, params_from_hf


def tiny_hf_model(seed=0, vocab=97, hidden=32, layers=3, heads=4, kv_heads=2, inter=64,
                  tie=False, rope_theta=10000.0, rope_scaling=None, eps=1e-6, max_pos=128):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=eps,
        rope_theta=rope_theta, rope_scaling=rope_scaling, tie_word_embeddings=tie,
        max_position_embeddings=max_pos, attn_implementation="eager", bos_token_id=1,
        eos_token_id=2, initializer_range=0.2,  # logits of order 1-10, so errors show
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms start at 1; randomise them so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def to_jax(model):
    cfg = config_from_hf(model.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return params_from_hf(sd, cfg), cfg


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()
