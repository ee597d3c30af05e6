"""Bad input gets an error that names the thing, before any compute."""

import numpy as np
import pytest

from alpaca_jax import ModelConfig, check_params, init_params, load_model, save_hf
from alpaca_jax.io.hf import config_from_hf, params_from_hf
from alpaca_jax.io.registry import REGISTRY
from alpaca_jax.tokenizer.bpe import bytes_to_unicode, ByteLevelBPETokenizer
from hf_reference import tiny_hf_model, to_jax

import jax


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError) as e:
        load_model("smollm-9000")
    assert "smollm-9000" in str(e.value)
    for name in REGISTRY:
        assert name in str(e.value)


def test_unsupported_architecture_names_the_field():
    d = tiny_hf_model().config.to_dict() | {"architectures": ["GPTNeoXForCausalLM"]}
    with pytest.raises(ValueError, match="architectures.*GPTNeoXForCausalLM"):
        config_from_hf(d)


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0},
                                     {"type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_scaling_names_the_field(scaling):
    d = tiny_hf_model().config.to_dict()
    d.pop("rope_parameters", None)
    d["rope_scaling"] = scaling
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf(d)


def test_bad_model_config_names_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_dict(dict(vocab_size=10, hidden_size=32, intermediate_size=64,
                                   num_layers=1, num_heads=4, num_kv_heads=4,
                                   rope_scaling={"rope_type": "ntk", "factor": 2.0}))
    with pytest.raises(ValueError, match="d_modle"):
        ModelConfig.from_dict({"d_modle": 3})


def test_missing_and_misshaped_tensors_name_tensor_and_shapes():
    model = tiny_hf_model()
    cfg = config_from_hf(model.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        params_from_hf(missing, cfg)
    bad = dict(sd)
    bad["model.layers.2.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    with pytest.raises(ValueError, match=r"k_proj.*\(8, 32\).*\(16, 32\)"):
        params_from_hf(bad, cfg)
    params, _ = to_jax(model)
    params["layers"]["w_up"] = params["layers"]["w_up"][:, :, :10]
    with pytest.raises(ValueError, match=r"w_up.*\(3, 32, 10\).*\(3, 32, 64\)"):
        check_params(params, cfg)


def test_tokenizer_vocabulary_must_match_model(tmp_path):
    model = tiny_hf_model(vocab=97)
    params, cfg = to_jax(model)
    pieces = [bytes_to_unicode()[b] for b in range(256)]  # 256 tokens for a 97-row table
    tok = ByteLevelBPETokenizer(pieces, [], [r"\S+|\s+"], special_ids=[], bos_id=None, eos_id=0)
    save_hf(params, cfg, tok, tmp_path)
    with pytest.raises(ValueError, match="256 tokens.*97 rows"):
        load_model(str(tmp_path))


def test_corrupt_safetensors_names_the_file(tmp_path):
    params, cfg = to_jax(tiny_hf_model())
    save_hf(params, cfg, None, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_corrupt_gguf_names_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ValueError, match="broken.gguf"):
        load_model(str(path))


def test_not_a_model_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.bin.*\.gguf"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_generation_rejects_overlong_requests():
    from alpaca_jax import generate_ids
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        generate_ids(params, cfg, [[1, 2, 3]], max_new_tokens=60)
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(params, cfg, [[]], max_new_tokens=4)


def test_hub_id_offline_gives_clear_error():
    # HF_HUB_OFFLINE=1 (conftest): the real hub code path runs and fails with a named error
    with pytest.raises(ValueError, match="HuggingFaceTB/NoSuchModel.*Hugging Face Hub"):
        load_model("HuggingFaceTB/NoSuchModel")


def test_corrupt_tokenizer_model_names_the_file(tmp_path):
    params, cfg = to_jax(tiny_hf_model())
    save_hf(params, cfg, None, tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece proto")
    with pytest.raises(ValueError, match=r"tokenizer\.model.*not a valid SentencePiece"):
        load_model(str(tmp_path))
