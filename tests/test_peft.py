"""LoRA / DoRA: against HF PEFT (both directions, logits and gradients), merge, training split,
dropout, and bad input."""
from __future__ import annotations

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

from alpaca_jax import forward, init_params
from alpaca_jax.config import ModelConfig
from alpaca_jax.data.batching import pack
from alpaca_jax.model.adapters import adapted
from alpaca_jax.model.transform import Transform
from alpaca_jax.peft import (add_lora, adapter_summary, is_adapter, load_peft, merge,
                             resolve_targets, save_peft)
from alpaca_jax.peft.methods import (PEFT_METHODS, PeftMethod, get_peft_method, method_of,
                                     register_peft_method)
from alpaca_jax.peft.methods import lora as lora_method
from alpaca_jax.train.loop import TrainConfig, train
from alpaca_jax.train.split import split
from alpaca_jax.train.step import make_train_step
from hf_reference import tiny_hf_model, to_jax
from test_forward_parity import assert_close_logits

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 13))


def peft_model(base, dora=False, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8.0,
               dropout=0.0, **kw):
    """A PEFT model with random (non-zero) A and B, so the adapter changes the logits."""
    conf = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_dora=dora,
                           lora_dropout=dropout, init_lora_weights=False, **kw)
    torch.manual_seed(1)
    return peft.get_peft_model(copy.deepcopy(base), conf)


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def base():
    model = tiny_hf_model(layers=2)
    params, cfg = to_jax(model)
    return model, params, cfg


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True},
                                   {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
                                   {"layers_to_transform": [1]}])
def test_load_peft_reproduces_peft_logits(base, tmp_path, dora, extra):
    model, params, cfg = base
    pm = peft_model(model, dora=dora, **extra).eval()
    ref = torch_logits(pm)
    assert np.abs(ref - torch_logits(model)).max() > 1e-2  # the adapter does something
    pm.save_pretrained(tmp_path)
    got = load_peft(params, cfg, tmp_path)
    assert_close_logits(np.asarray(forward(got, TOKENS, cfg)[0]), ref)
    assert_close_logits(np.asarray(forward(merge(got), TOKENS, cfg)[0]), ref)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_save_peft_loads_in_peft(base, tmp_path, method):
    model, params, cfg = base
    p = add_lora(params, cfg, jax.random.PRNGKey(0), rank=3, alpha=5.0, targets=["k", "o", "up"],
                 method=method, dropout=0.1)
    # move B (and m) off their initial values so the adapter is not a no-op
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
    group = p["layers"]["lora"]
    for ad in group.values():
        ad["b"] = 0.3 * jax.random.normal(next(keys), ad["b"].shape)
        if "m" in ad:
            ad["m"] = ad["m"] * (1 + 0.2 * jax.random.normal(next(keys), ad["m"].shape))
    ours = np.asarray(forward(p, TOKENS, cfg)[0])
    save_peft(p, cfg, tmp_path, base_model_name_or_path="tiny")
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["r"] == 3 and conf["lora_alpha"] == 5.0 and conf["lora_dropout"] == pytest.approx(0.1)
    assert conf["use_dora"] == (method == "dora")
    assert sorted(conf["target_modules"]) == ["k_proj", "o_proj", "up_proj"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert_close_logits(ours, torch_logits(pm))
    assert np.abs(ours - np.asarray(forward(params, TOKENS, cfg)[0])).max() > 1e-2


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_fresh_adapter_changes_nothing_and_merge_is_exact(base, method, scaling):
    _, params, cfg = base
    p = add_lora(params, cfg, jax.random.PRNGKey(0), rank=4, alpha=16, method=method,
                 scaling=scaling)
    ref = np.asarray(forward(params, TOKENS, cfg)[0])
    np.testing.assert_allclose(np.asarray(forward(p, TOKENS, cfg)[0]), ref, rtol=0, atol=1e-5)
    summary = adapter_summary(p)
    assert set(summary) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert summary["q"]["scale"] == pytest.approx(16 / 4 if scaling == "standard" else 16 / 2)
    # a trained adapter: merged == un-merged, and the merged tree is a plain model
    p["layers"]["lora"]["wq"]["b"] = jnp.ones_like(p["layers"]["lora"]["wq"]["b"]) * 0.05
    merged = merge(p)
    assert "lora" not in merged["layers"]
    assert_close_logits(np.asarray(forward(merged, TOKENS, cfg)[0]),
                        np.asarray(forward(p, TOKENS, cfg)[0]))


def test_targets_rank_and_alpha_come_from_the_arguments(base):
    _, params, cfg = base
    p = add_lora(params, cfg, jax.random.PRNGKey(0), rank=2, alpha=7, targets=["q_proj", "w_up"])
    group = p["layers"]["lora"]
    assert sorted(group) == ["w_up", "wq"]
    assert group["wq"]["a"].shape == (2, 32, 2) and group["w_up"]["b"].shape == (2, 2, 64)
    np.testing.assert_allclose(group["wq"]["scale"], 3.5)
    assert resolve_targets("*_proj") == ["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"]
    assert resolve_targets(["o", "gate"]) == ["wo", "w_gate"]
    # PEFT's initialisation: A ~ U(+-1/sqrt(in)), B = 0
    a = np.asarray(group["w_up"]["a"])
    assert np.abs(a).max() <= 1 / np.sqrt(32) and np.abs(a).max() > 0.8 / np.sqrt(32)
    assert not np.asarray(group["w_up"]["b"]).any()


@pytest.mark.parametrize("dora", [False, True])
def test_gradients_match_peft_autograd(base, dora):
    """d loss / d (A, B, m) from our factored path equals torch autograd through PEFT."""
    model, params, cfg = base
    pm = peft_model(model, dora=dora).eval()
    tok = torch.as_tensor(TOKENS)
    loss = torch.nn.functional.cross_entropy(pm(tok).logits[:, :-1].reshape(-1, 97),
                                             tok[:, 1:].reshape(-1))
    loss.backward()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        p = load_peft(params, cfg, d)
    trainable, frozen = split(p, is_adapter)

    def f(t):
        from alpaca_jax.train.split import combine
        logits = forward(combine(t, frozen), TOKENS, cfg)[0]
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1))
    g = jax.grad(f)(trainable)["layers"]["lora"]
    for name, module in (("wq", "self_attn.q_proj"), ("w_down", "mlp.down_proj")):
        layer = pm.base_model.model.model.layers[1]
        mod = layer.get_submodule(module)
        np.testing.assert_allclose(g[name]["a"][1], mod.lora_A["default"].weight.grad.numpy().T,
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g[name]["b"][1], mod.lora_B["default"].weight.grad.numpy().T,
                                   rtol=1e-4, atol=1e-6)
        if dora:
            np.testing.assert_allclose(
                g[name]["m"][1], mod.lora_magnitude_vector["default"].weight.grad.numpy(),
                rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_matches_peft_in_training_mode(base, tmp_path, dora, monkeypatch):
    """With the same dropout mask on both sides, train-mode logits equal PEFT's (this pins the
    DoRA-with-dropout formula, which differs from merging)."""
    model, params, cfg = base
    pm = peft_model(model, dora=dora, targets=("v_proj",), dropout=0.5)
    pm.save_pretrained(tmp_path)
    p = load_peft(params, cfg, tmp_path)
    mask = np.random.default_rng(3).random((2, 13, 32)) < 0.5

    class FixedDropout(torch.nn.Module):
        def forward(self, x):
            return x * torch.as_tensor(mask, dtype=x.dtype) / 0.5
    for layer in pm.base_model.model.model.layers:
        layer.self_attn.v_proj.lora_dropout["default"] = FixedDropout()
    pm.train()
    ref = torch_logits(pm)
    monkeypatch.setattr(lora_method, "_dropout",
                        lambda x, rate, key: jnp.where(mask, x / (1 - rate), 0.0))
    got = np.asarray(forward(p, TOKENS, cfg, rng=jax.random.PRNGKey(0))[0])
    assert_close_logits(got, ref)
    assert np.abs(got - np.asarray(forward(p, TOKENS, cfg)[0])).max() > 1e-3


def test_dropout_is_keyed_and_off_without_a_key(base):
    _, params, cfg = base
    p = add_lora(params, cfg, jax.random.PRNGKey(0), rank=4, dropout=0.3)
    p["layers"]["lora"]["wv"]["b"] = jnp.ones_like(p["layers"]["lora"]["wv"]["b"])
    run = lambda key: np.asarray(forward(p, TOKENS, cfg, rng=key)[0])  # noqa: E731
    a, b = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, run(jax.random.PRNGKey(0)))
    assert np.abs(a - b).max() > 1e-3
    assert np.abs(a - run(None)).max() > 1e-3
    no_drop = add_lora(params, cfg, jax.random.PRNGKey(0), rank=4, dropout=0.0)
    no_drop["layers"]["lora"]["wv"]["b"] = p["layers"]["lora"]["wv"]["b"]
    np.testing.assert_allclose(np.asarray(forward(no_drop, TOKENS, cfg, rng=jax.random.PRNGKey(0))[0]),
                               run(None), rtol=0, atol=1e-5)


def test_only_adapters_train(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    p = add_lora(params, cfg, jax.random.PRNGKey(1), rank=4, alpha=8, method="dora", dropout=0.1)
    trainable, frozen = split(p, is_adapter)
    names = [jax.tree_util.keystr(k) for k, _ in
             jax.tree_util.tree_flatten_with_path(trainable)[0]]
    assert names and all("['lora']" in n and n[-5:] in ("['a']", "['b']", "['m']") for n in names)
    # the optimizer state holds adapter-sized moments only
    opt_state = optax.adam(1e-3).init(trainable)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(opt_state))
    n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    assert n_state <= 2 * n_adapter + 1
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 64, 20) for _ in range(8)]
    rows = pack(ids, [np.ones(20, np.float32)] * 8, 24, 0)
    tc = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=3, save_every=3,
                     async_checkpoints=False)
    res = train(p, cfg, rows, rows, tc, tmp_path, trainable=is_adapter)
    out = res.params
    for k in ("embed", "final_norm"):
        np.testing.assert_array_equal(out[k], params[k])
    for k, v in params["layers"].items():
        np.testing.assert_array_equal(out["layers"][k], v)
    moved = out["layers"]["lora"]["wq"]
    assert np.abs(np.asarray(moved["b"])).max() > 0
    np.testing.assert_array_equal(moved["scale"], p["layers"]["lora"]["wq"]["scale"])
    assert res.val_history[-1]["val_loss"] < res.val_history[0]["val_loss"] + 1.0


def test_train_step_draws_dropout_from_the_step_index():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    p = add_lora(init_params(cfg, jax.random.PRNGKey(0)), cfg, jax.random.PRNGKey(1), rank=4,
                 dropout=0.5)
    p["layers"]["lora"]["wq"]["b"] = jnp.ones_like(p["layers"]["lora"]["wq"]["b"])
    t, f = split(p, is_adapter)
    rows = pack([np.arange(3, 23)] * 2, [np.ones(20, np.float32)] * 2, 24, 0).rows(np.arange(2))
    batch = {k: v[None] for k, v in rows.items()}
    opt = optax.sgd(0.0)
    step = make_train_step(cfg, opt, seed=0)
    copy_t = lambda: jax.tree_util.tree_map(jnp.array, t)  # noqa: E731 (the step donates)
    l0 = float(step(copy_t(), f, opt.init(t), batch, 0)[2]["loss"])
    assert l0 == float(step(copy_t(), f, opt.init(t), batch, 0)[2]["loss"])
    assert l0 != float(step(copy_t(), f, opt.init(t), batch, 1)[2]["loss"])


def test_bad_input_is_named(base, tmp_path):
    model, params, cfg = base
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="'qq' matches no linear layer"):
        add_lora(params, cfg, key, targets=["q", "qq"])
    with pytest.raises(ValueError, match="rank 33 exceeds the smaller dimension of wq"):
        add_lora(params, cfg, key, rank=33, targets=["q"])
    with pytest.raises(ValueError, match="method 'lokr'"):
        add_lora(params, cfg, key, method="lokr")
    with pytest.raises(ValueError, match="dropout must be in"):
        add_lora(params, cfg, key, dropout=1.0)
    with pytest.raises(ValueError, match="already hold adapters"):
        add_lora(add_lora(params, cfg, key), cfg, key)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft(params, cfg, tmp_path)
    # an adapter for a bigger model: shapes do not fit
    big = tiny_hf_model(layers=2, hidden=48, heads=4, kv_heads=2)
    peft_model(big).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match=r"lora_A \(4, 64\) / lora_B \(48, 4\) do not fit "
                                         r"the model's \[32, 64\] weight"):
        load_peft(params, cfg, tmp_path / "big")
    # an adapter for a deeper model
    deep = tiny_hf_model(layers=4)
    peft_model(deep).save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match="is for layer 2, but the model has 2 layers"):
        load_peft(params, cfg, tmp_path / "deep")
    # an adapter that trains the head too cannot be placed silently
    peft_model(model, targets=("q_proj", "lm_head")).save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="lm_head"):
        load_peft(params, cfg, tmp_path / "head")
    # a corrupt weights file
    peft_model(model).save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        load_peft(params, cfg, tmp_path / "bad")
    with pytest.raises(ValueError, match="hold no adapters"):
        save_peft(params, cfg, tmp_path / "none")


@dataclasses.dataclass(frozen=True, eq=False)
class _Spy(Transform):
    """`adapted`, recording what each call sees: (name, the tree's keys, whether a key came)."""
    seen: list

    def weight(self, tree, name):
        self.seen.append((name, frozenset(tree), False))
        return adapted.weight(tree, name)

    def linear(self, x, tree, name, *, rng=None):
        self.seen.append((name, frozenset(tree), rng is not None))
        return adapted.linear(x, tree, name, rng=rng)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_randomness_comes_only_from_the_rng_argument(base, method):
    _, params, cfg = base
    p = add_lora(params, cfg, jax.random.PRNGKey(0), rank=4, dropout=0.3, method=method,
                 targets=["q", "v", "down"])
    for ad in p["layers"]["lora"].values():
        ad["b"] = jnp.full_like(ad["b"], 0.5)
    before = jax.tree_util.tree_structure(p)

    def run(key):
        spy = _Spy([])
        out = np.asarray(forward(p, TOKENS, cfg, rng=key, materialize=spy)[0])
        return out, spy.seen
    a, seen = run(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, run(jax.random.PRNGKey(0))[0])      # same key, same out
    assert np.abs(a - run(jax.random.PRNGKey(1))[0]).max() > 1e-3         # another key differs
    off, seen_off = run(None)
    assert np.abs(a - off).max() > 1e-3
    np.testing.assert_array_equal(off, np.asarray(forward(p, TOKENS, cfg)[0]))
    # the key is an argument: every block kernel got one, the head and embedding did not, and
    # no tree the transform saw (nor the params afterwards) holds an 'rng' entry
    blocks = [(n, got) for n, keys, got in seen if "attn_norm" in keys]
    assert blocks and all(got for _, got in blocks)
    assert not any(got for n, keys, got in seen if "attn_norm" not in keys)
    assert not any(got for _, _, got in seen_off)
    assert not any("rng" in keys for _, keys, _ in seen + seen_off)
    assert jax.tree_util.tree_structure(p) == before
    assert not any("rng" in jax.tree_util.keystr(k)
                   for k, _ in jax.tree_util.tree_flatten_with_path(p)[0])


def test_the_hook_is_a_transform(base):
    _, params, cfg = base
    with pytest.raises(TypeError, match="materialize must be a Transform"):
        forward(params, TOKENS, cfg, materialize=lambda tree, name: tree[name])


def test_an_unknown_peft_method_names_the_registered_ones(base, tmp_path):
    _, params, cfg = base
    registered = ", ".join(PEFT_METHODS)
    assert set(PEFT_METHODS) >= {"lora", "dora"}
    for call in (lambda: add_lora(params, cfg, jax.random.PRNGKey(0), method="lokr"),
                 lambda: get_peft_method("lokr")):
        with pytest.raises(ValueError, match=rf"method 'lokr' is not a registered PEFT "
                                             rf"method; registered: {registered}$"):
            call()
    # an adapter whose leaves fit no method is named, not silently treated as LoRA
    p = add_lora(params, cfg, jax.random.PRNGKey(0), targets=["q"])
    p["layers"]["lora"]["wq"]["extra"] = jnp.zeros((cfg.num_layers,))
    with pytest.raises(ValueError, match="matches no registered PEFT method.*lora.*dora"):
        forward(p, TOKENS, cfg)
    # a file of a PEFT type no method reads
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(ValueError, match="'LOHA'.*matches no registered PEFT method.*lora.*dora"):
        load_peft(params, cfg, tmp_path)
    # registering a method that could not be told apart from LoRA is refused
    clone = type("Clone", (PeftMethod,), {"name": "clone", "trainable": ("a", "b")})()
    with pytest.raises(ValueError, match="same leaves as 'lora'"):
        register_peft_method(clone)
    assert "clone" not in PEFT_METHODS


@pytest.mark.parametrize("name", list(PEFT_METHODS))
def test_every_registered_method_round_trips_through_peft_files(base, tmp_path, name):
    _, params, cfg = base
    method = get_peft_method(name)
    p = add_lora(params, cfg, jax.random.PRNGKey(0), rank=3, alpha=6.0, method=name,
                 targets=["q", "o", "down"], dropout=0.1)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
    for ad in p["layers"]["lora"].values():       # every trainable leaf off its initial value
        for leaf in method.trainable:
            ad[leaf] = ad[leaf] + 0.1 * jax.random.normal(next(keys), ad[leaf].shape)
    save_peft(p, cfg, tmp_path)
    got = load_peft(params, cfg, tmp_path)
    assert sorted(got["layers"]["lora"]) == sorted(p["layers"]["lora"])
    for kernel, ad in p["layers"]["lora"].items():
        back = got["layers"]["lora"][kernel]
        assert method_of(back) is method and set(back) == set(ad)
        for leaf in method.trainable:
            np.testing.assert_array_equal(np.asarray(back[leaf]), np.asarray(ad[leaf]))
        for leaf in method.settings:
            np.testing.assert_allclose(np.asarray(back[leaf]), np.asarray(ad[leaf]), rtol=1e-6)
    assert {k: v["method"] for k, v in adapter_summary(got).items()} == {
        "q": name, "o": name, "down": name}
    assert_close_logits(np.asarray(forward(got, TOKENS, cfg)[0]),
                        np.asarray(forward(p, TOKENS, cfg)[0]))


def test_dropout_off_the_cpu_is_the_same_function_without_a_cond(monkeypatch):
    """On a GPU `_dropout` skips its `lax.cond` (a host sync per adapter per layer there): the
    unconditional path must give the CPU path's masks at rate 0.05 and exactly `x` at rate 0."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 16))
    key = jax.random.PRNGKey(7)
    on_cpu = {r: lora_method._dropout(x, jnp.float32(r), key) for r in (0.0, 0.05)}
    monkeypatch.setattr(lora_method.jax, "default_backend", lambda: "gpu")
    for r, want in on_cpu.items():
        got = jax.jit(lora_method._dropout)(x, jnp.float32(r), key)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(jnp.mean(on_cpu[0.05] == 0)) > 0.01   # the rate-0.05 mask dropped something
