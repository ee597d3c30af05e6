"""Memory behaviour that can be pinned on tiny models: train-step temporaries (QAT + LoRA near
LoRA, bf16 compute without a weight copy), remat policies, the bf16 streaming loader and
writer, placement with a sharding. The ~1B figures are `benchmarks/bench_memory.py`'s."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax import load_model, save_hf
from alpaca_jax.config import REMAT_POLICIES, ModelConfig
from alpaca_jax.io.safetensors_io import SafetensorsFile
from alpaca_jax.model.params import init_params
from alpaca_jax.train.loop import master_copy
from benchmarks.bench_memory import step_temporaries

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
            num_kv_heads=2)


def _temps(method, remat=False):
    return step_temporaries(method, remat, model=TINY, batch=1, seq=32)["temp_bytes"]


def test_qat_lora_and_bf16_lora_temporaries_stay_near_lora():
    """Before: QAT Q4_0 + LoRA kept a fake-quantized copy of every weight (and the quantizer's
    masks) for the backward, bf16 compute a bf16 copy; both now recompute them per layer."""
    lora = _temps("lora")
    assert _temps("qat_q4_0_lora") <= 1.2 * lora
    assert _temps("lora_bf16") <= 1.2 * lora


def test_remat_setting_names_the_choices():
    from alpaca_jax.model.remat import policy

    # JAX's policy of that name, which also keeps a K-quant's codes (tests/test_kquants.py)
    assert policy("none") is None and callable(policy("dots_saveable"))
    assert {p for p in REMAT_POLICIES if p != "none" and policy(p) is None} == set()
    assert ModelConfig(**TINY, remat=True).remat == "block"
    assert ModelConfig(**TINY, remat=False).remat == "none"
    with pytest.raises(ValueError, match="ModelConfig.remat='blocks'"):
        ModelConfig(**TINY, remat="blocks")


def test_bf16_checkpoint_round_trip_stays_bf16(tmp_path):
    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.PRNGKey(1), dtype=jnp.bfloat16)
    save_hf(params, cfg, None, tmp_path, max_shard_bytes=40_000)     # several shards
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    header = SafetensorsFile(shards[0]).header
    assert {h["dtype"] for h in header.values()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"

    back, _, _ = load_model(str(tmp_path))                          # default: the file's dtype
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    wide, _, _ = load_model(str(tmp_path), "float32")
    assert {x.dtype for x in jax.tree_util.tree_leaves(wide)} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="param_dtype 'bf16' is not supported"):
        load_model(str(tmp_path), "bf16")


def test_truncated_shard_is_named(tmp_path):
    cfg = ModelConfig(**TINY)
    save_hf(init_params(cfg, jax.random.PRNGKey(2)), cfg, None, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors file"):
        load_model(str(tmp_path))


def test_loader_places_leaves_with_a_given_sharding(tmp_path):
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    cfg = ModelConfig(**TINY)
    params = init_params(cfg, jax.random.PRNGKey(3))
    save_hf(params, cfg, None, tmp_path)
    mesh = jax.make_mesh((2,), ("layers",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:2])

    def sharding(path, shape):
        spec = P("layers") if path.startswith("layers/") else P()
        return NamedSharding(mesh, spec)

    back, _, _ = load_model(str(tmp_path), sharding=sharding)
    wq = back["layers"]["wq"]
    assert wq.sharding == NamedSharding(mesh, P("layers"))
    assert {s.data.shape[0] for s in wq.addressable_shards} == {cfg.num_layers // 2}
    np.testing.assert_array_equal(np.asarray(wq), np.asarray(params["layers"]["wq"]))


def test_master_copy_is_fp32_and_a_new_buffer():
    x = jnp.ones((3,), jnp.bfloat16)
    y = jnp.ones((3,), jnp.float32)
    assert master_copy(x).dtype == jnp.float32
    assert master_copy(y) is not y and master_copy(jnp.arange(3)).dtype == jnp.int32
