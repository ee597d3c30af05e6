"""HF safetensors in and out: what save_hf writes, transformers loads with the same logits."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from alpaca_jax import forward, load_hf, load_model, save_hf
from hf_reference import hf_logits, tiny_hf_model, to_jax
from test_forward_parity import VARIANTS, assert_close_logits


@pytest.mark.parametrize("name", ["gqa_untied", "gqa_tied", "rope_llama3", "rope_linear"])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, name):
    params, cfg = to_jax(tiny_hf_model(**VARIANTS[name]))
    save_hf(params, cfg, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40))
    assert_close_logits(forward(params, tokens, cfg)[0], hf_logits(hf.eval(), tokens))


def test_transformers_save_pretrained_loads_here(tmp_path):
    model = tiny_hf_model(**VARIANTS["rope_llama3"])
    model.save_pretrained(tmp_path)
    params, cfg, tok = load_hf(tmp_path)
    assert tok is None and cfg.rope_scaling.rope_type == "llama3"
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 30))
    assert_close_logits(forward(params, tokens, cfg)[0], hf_logits(model, tokens))


def test_sharded_checkpoint_round_trip(tmp_path):
    params, cfg = to_jax(tiny_hf_model())
    save_hf(params, cfg, None, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back, cfg2, _ = load_model(str(tmp_path))
    assert cfg2 == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tokens = np.arange(12)[None]
    assert_close_logits(forward(params, tokens, cfg)[0], hf_logits(hf.eval(), tokens))


def test_bf16_checkpoint_loads_as_requested_dtype(tmp_path):
    model = tiny_hf_model().to(dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    params, cfg, _ = load_hf(tmp_path, dtype=np.float32)
    assert params["layers"]["wq"].dtype == np.float32
    import ml_dtypes
    params16, _, _ = load_hf(tmp_path, dtype=ml_dtypes.bfloat16)
    assert params16["embed"].dtype == ml_dtypes.bfloat16
