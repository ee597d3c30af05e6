"""The angular-distance criterion (Gromov et al. 2024) against a reference computed from
forward hooks on a `transformers` LLaMA, and its preset."""
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from alpaca_jax.prune import block_scores, prune_plan, select_blocks
from hf_reference import tiny_hf_model, to_jax

LAYERS = 6


@pytest.fixture(scope="module")
def hf_and_jax():
    model = tiny_hf_model(seed=7, layers=LAYERS, tie=False)
    with torch.no_grad():   # blocks 1 and 2 barely rotate the stream: the best runs are inside
        for j in (1, 2):    # the model, not at its end, where a random model puts them
            model.model.layers[j].self_attn.o_proj.weight.mul_(0.15)
            model.model.layers[j].mlp.down_proj.weight.mul_(0.15)
    params, cfg = to_jax(model)
    rng = np.random.default_rng(11)
    calib = rng.integers(0, cfg.vocab_size, (5, 10)).astype(np.int32)   # rows of different content
    calib[1] = calib[0][::-1]                       # a row with the same tokens in another order
    return model, params, cfg, calib


def _hf_last_token_streams(model, ids):
    """x_j, j = 0..L, at each row's last token: the input of decoder layer j from a pre-hook;
    x_L is the last layer's output, before model.norm (HF's last hidden_states entry is after
    it)."""
    ins, out = {}, {}

    def pre(j):
        def hook(mod, args, kwargs):
            ins[j] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
        return hook

    def post(mod, args, kwargs, o):
        out["last"] = (o[0] if isinstance(o, tuple) else o).detach()

    layers = model.model.layers
    hooks = [layer.register_forward_pre_hook(pre(j), with_kwargs=True)
             for j, layer in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(post, with_kwargs=True))
    with torch.no_grad():
        model(torch.as_tensor(ids).long(), use_cache=False)
    for h in hooks:
        h.remove()
    xs = [ins[j] for j in range(len(layers))] + [out["last"]]
    return np.stack([x[:, -1].double().numpy() for x in xs])     # [L+1, N, D]


def _reference(streams, n, keep_first=0, keep_last=0):
    L = streams.shape[0] - 1
    d = []
    for l in range(L - n + 1):
        a, b = streams[l], streams[l + n]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        d.append(np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi))   # per row, then the mean
    d = np.array(d)
    starts = np.arange(keep_first, L - n - keep_last + 1)
    best = int(starts[np.argmin(d[starts])])                        # argmin: first (smallest l)
    return d, list(range(best, best + n))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_angular_plan_equals_transformers_hooks(hf_and_jax, n):
    model, params, cfg, calib = hf_and_jax
    streams = _hf_last_token_streams(model, calib)
    d, run = _reference(streams, n)
    assert len(set(np.round(d, 4))) == d.size      # the starts really differ: the test can fail
    plan = prune_plan(params, cfg, calib, "angular", n, batch_size=2)
    assert plan["criterion"] == "angular" and plan["pruned"] == run and plan["order"] == run
    assert plan["scores"][LAYERS - n + 1:] == [None] * (n - 1)
    np.testing.assert_allclose(plan["scores"][:LAYERS - n + 1], d, rtol=1e-4, atol=1e-6)
    assert plan["starts"][0] == run[0] and sorted(plan["starts"]) == list(range(LAYERS - n + 1))

    # protection: a start whose run would touch a protected block is excluded
    if n == 3:   # a run, not the n lowest d(l, 1) (those are 1, 2, 5 here)
        d1, _ = _reference(streams, 1)
        assert run != sorted(np.argsort(d1, kind="stable")[:n].tolist())
    kf, kl = (run[0] + 1, 0) if run[0] + 1 + n <= LAYERS else (0, LAYERS - run[-1])
    d2, run2 = _reference(streams, n, kf, kl)
    got = prune_plan(params, cfg, calib, "angular", n, keep_first=kf, keep_last=kl)
    assert got["pruned"] == run2 != run
    assert all(kf <= s <= LAYERS - n - kl for s in got["starts"])
    np.testing.assert_allclose(got["scores"][:LAYERS - n + 1], d, rtol=1e-4, atol=1e-6)


def test_angular_block_scores_and_selection(hf_and_jax):
    model, params, cfg, calib = hf_and_jax
    d1, _ = _reference(_hf_last_token_streams(model, calib), 1)
    np.testing.assert_allclose(block_scores(params, cfg, calib, "angular"), d1, rtol=1e-4,
                               atol=1e-6)
    assert select_blocks(d1, 1, criterion="angular") == [int(np.argmin(d1))]
    with pytest.raises(ValueError, match="use prune_plan"):   # a run is not the n lowest d(l, 1)
        select_blocks(d1, 2, criterion="angular")
    with pytest.raises(ValueError, match="'angular' needs calibration ids"):
        prune_plan(params, cfg, None, "angular", 2)
    with pytest.raises(ValueError, match="re-scores with the ppl criterion; got 'angular'"):
        prune_plan(params, cfg, calib, "angular", 2, iterative=True)
    empty = prune_plan(params, cfg, calib, "angular", 0)
    assert empty["pruned"] == [] and empty["scores"] == [None] * LAYERS


def test_angular_is_a_setting_of_the_one_app():
    from experiments.app import CONF_DIR, register_schema, to_job
    from alpaca_jax.recipe.checks import check_prune

    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        job = to_job(compose("pipeline", overrides=["prune.criterion=angular"]))
        assert job.prune.criterion == "angular" and job.prune.ratio == 0.2
        check_prune(job.prune)
        bad = to_job(compose("pipeline", overrides=["prune.criterion=angular",
                                                    "prune.iterative=true"]))
    with pytest.raises(ValueError, match="re-scores with the ppl criterion; got 'angular'"):
        check_prune(bad.prune)
