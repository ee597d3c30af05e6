"""Depth pruning against references written elsewhere: a `transformers` model with a layer
deleted (PPL), torch autograd (Taylor), forward hooks (block influence)."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alpaca_jax import forward, init_params
from alpaca_jax.config import ModelConfig
from alpaca_jax.peft import add_lora
from alpaca_jax.prune import (block_order, block_scores, calibration_ids, drop_layers,
                              n_blocks_for, prune_plan, sample_windows, select_blocks)
from hf_reference import tiny_hf_model, to_jax

LAYERS = 5


@pytest.fixture(scope="module")
def hf_and_jax():
    model = tiny_hf_model(seed=3, layers=LAYERS, tie=False)
    params, cfg = to_jax(model)
    calib = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 12)).astype(np.int32)
    return model, params, cfg, calib


def _torch_ppl(model, ids):
    with torch.no_grad():
        logits = model(torch.as_tensor(ids), use_cache=False).logits.double().numpy()
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))   # exp(mean NLL over all tokens), not a mean of ppls


def _without_layer(model, i):
    m = copy.deepcopy(model)
    del m.model.layers[i]
    m.config.num_hidden_layers -= 1
    return m


def test_ppl_score_equals_transformers_model_with_layer_deleted(hf_and_jax):
    model, params, cfg, calib = hf_and_jax
    got = block_scores(params, cfg, calib, "ppl")
    ref = np.array([_torch_ppl(_without_layer(model, i), calib) for i in range(LAYERS)])
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert len(set(np.round(ref, 6))) == LAYERS   # the blocks really differ: the test can fail
    # batching the calibration rows changes nothing but the summation order
    np.testing.assert_allclose(block_scores(params, cfg, calib, "ppl", batch_size=3), ref,
                               rtol=1e-5)


def test_taylor_score_equals_torch_autograd(hf_and_jax):
    model, params, cfg, calib = hf_and_jax
    m = copy.deepcopy(model)
    for batch in (calib[:2], calib[2:]):       # gradients summed with sign over batches
        x = torch.as_tensor(batch).long()
        m(x, labels=x, use_cache=False).loss.backward()
    ref = np.zeros(LAYERS)
    for name, p in m.named_parameters():
        if name.startswith("model.layers."):
            ref[int(name.split(".")[2])] += (p * p.grad).abs().sum().item()
    got = block_scores(params, cfg, calib, "taylor", batch_size=2)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    np.testing.assert_array_equal(block_scores(params, cfg, calib, "taylor+", batch_size=2), got)


def test_magnitude_and_block_influence_against_torch(hf_and_jax):
    model, params, cfg, calib = hf_and_jax
    mag = np.zeros(LAYERS)
    for name, p in model.named_parameters():
        if name.startswith("model.layers."):
            mag[int(name.split(".")[2])] += p.detach().abs().sum().item()
    np.testing.assert_allclose(block_scores(params, cfg, None, "magnitude"), mag, rtol=1e-6)

    ios = []
    hooks = [layer.register_forward_hook(
        lambda mod, args, kwargs, out: ios.append((kwargs.get("hidden_states", args[0] if args
                                                   else None), out[0] if isinstance(out, tuple)
                                                   else out)), with_kwargs=True)
        for layer in model.model.layers]
    with torch.no_grad():
        model(torch.as_tensor(calib), use_cache=False)
    for h in hooks:
        h.remove()
    ref = []
    for x, y in ios:
        x, y = x.double().numpy(), y.double().numpy()
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        ref.append(1.0 - cos.mean())
    np.testing.assert_allclose(block_scores(params, cfg, calib, "bi"), ref, rtol=1e-4,
                               atol=1e-6)


def test_drop_layers_equals_masked_forward_adapters_included():
    cfg = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=4,
                      num_heads=4, num_kv_heads=2)
    params = add_lora(init_params(cfg, jax.random.PRNGKey(0)), cfg, jax.random.PRNGKey(1),
                      rank=2, alpha=4.0, targets="all")
    lora = params["layers"]["lora"]    # nonzero B, so a wrongly sliced adapter would show
    params["layers"]["lora"] = jax.tree.map(lambda x: x + 0.05, lora)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 9)))
    masked, _ = forward(params, tokens, cfg, layer_mask=np.array([True, False, True, False]))
    small, small_cfg = drop_layers(params, cfg, [3, 1])
    assert small_cfg.num_layers == 2
    assert small["layers"]["lora"]["wq"]["a"].shape[0] == 2
    got, _ = forward(small, tokens, small_cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(masked), atol=1e-6)
    for bad, msg in (([4], "outside"), ([1, 1], "more than once"), ([0, 1, 2, 3], "all 4")):
        with pytest.raises(ValueError, match=msg):
            drop_layers(params, cfg, bad)


def test_selection_honours_protection():
    scores = np.array([0.1, 0.2, 5.0, 0.3, 4.0, 0.05, 0.01, 3.0])
    assert select_blocks(scores, 3) == [0, 5, 6]
    assert block_order(scores) == [6, 5, 0, 1, 3, 7, 4, 2]
    # the paper's default for taylor+: the first four and the last two blocks stay
    assert select_blocks(scores, 2, criterion="taylor+") == [4, 5]
    assert select_blocks(scores, 2, criterion="taylor+", keep_first=0, keep_last=0) == [5, 6]
    # the authors' code protects every criterion the same way
    assert select_blocks(scores, 2, keep_first=4, keep_last=2, criterion="ppl") == [4, 5]
    with pytest.raises(ValueError, match="only 2 are removable"):
        select_blocks(scores, 3, criterion="taylor+")
    with pytest.raises(ValueError, match="unknown pruning criterion 'entropy'"):
        select_blocks(scores, 1, criterion="entropy")
    with pytest.raises(ValueError, match="one block must remain"):
        select_blocks(scores, 8)
    assert (n_blocks_for(0.2, 32), n_blocks_for(0.35, 32), n_blocks_for(0.2, 30)) == (6, 11, 6)


def test_iterative_ppl_rescoring_on_the_pruned_model(hf_and_jax):
    model, params, cfg, calib = hf_and_jax
    one_shot = prune_plan(params, cfg, calib, "ppl", 2)
    it = prune_plan(params, cfg, calib, "ppl", 2, iterative=True)
    first = it["order"][0]
    assert first == one_shot["order"][0]
    np.testing.assert_allclose(it["scores"], one_shot["scores"], rtol=1e-6)
    np.testing.assert_allclose(it["rounds"][0]["base_ppl"], one_shot["base_ppl"], rtol=1e-6)
    second = it["rounds"][1]["scores"]
    assert str(first) not in second and len(second) == LAYERS - 1
    for i, got in second.items():   # the model with both blocks deleted, in transformers
        pair = sorted([first, int(i)], reverse=True)
        ref = _torch_ppl(_without_layer(_without_layer(model, pair[0]), pair[1]), calib)
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert it["order"][1] == int(min(second, key=second.get))


def test_random_is_seeded_and_criteria_are_checked(hf_and_jax):
    _, params, cfg, calib = hf_and_jax
    a, b = (block_scores(params, cfg, None, "random", seed=s) for s in (0, 0))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, block_scores(params, cfg, None, "random", seed=1))
    with pytest.raises(ValueError, match="unknown pruning criterion"):
        block_scores(params, cfg, calib, "l2")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        block_scores(params, cfg, calib + cfg.vocab_size, "ppl")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        block_scores(params, cfg, calib[:, :1], "ppl")
    with pytest.raises(ValueError, match="needs calibration ids"):
        block_scores(params, cfg, None, "taylor")
    with pytest.raises(ValueError, match="iterative"):
        prune_plan(params, cfg, calib, "taylor", 1, iterative=True)


class _CharTokenizer:
    """One id per character, BOS (0) first, as a LLaMA tokenizer adds it by default."""
    bos_id = 0

    def encode(self, text):
        return [0] + [ord(c) for c in text]


def test_calibration_windows_follow_the_paper():
    docs = ["ab", "x" * 40, "short", "".join(chr(65 + k % 26) for k in range(60)), "y" * 30]
    tok = _CharTokenizer()
    ids = sample_windows(docs, tok, n=3, seq_len=20, seed=5)
    assert ids.shape == (3, 20)
    np.testing.assert_array_equal(ids, sample_windows(docs, tok, n=3, seq_len=20, seed=5))
    sources = []
    for row in ids:   # each window is a contiguous slice of a distinct document with BOS
        hits = [d for d, doc in enumerate(docs) if _is_window(row, tok.encode(doc))]
        assert hits, row
        sources.append(hits[0])
    assert len(set(sources)) == 3
    assert 0 not in ids[:, 1:]          # BOS only ever at a window's start
    with pytest.raises(ValueError, match="need 4 documents of at least 20 tokens; the corpus "
                                         "has 3 of 5"):
        sample_windows(docs, tok, n=4, seq_len=20)


def _is_window(row, ids):
    return any(list(row) == ids[j:j + len(row)] for j in range(len(ids) - len(row) + 1))


def test_calibration_from_npy_file(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.arange(24).reshape(3, 8))
    np.testing.assert_array_equal(calibration_ids(str(path), vocab_size=30),
                                  np.arange(24).reshape(3, 8))
    with pytest.raises(ValueError, match="calib.npy: token ids span"):
        calibration_ids(str(path), vocab_size=10)
    np.save(path, np.arange(4).reshape(4, 1))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        calibration_ids(str(path), vocab_size=10)
