"""Training mechanics on tiny models: split, accumulation, packing, guards, resume (on a mesh:
`test_mesh.py`)."""
import functools

import numpy as np
import pytest
import jax
import optax

from alpaca_jax import ModelConfig, init_params
from alpaca_jax.data.batching import pack
from alpaca_jax.train.checkpoint import CheckpointRestoreError
from alpaca_jax.train.loop import NonFiniteLossError, TrainConfig, train
from alpaca_jax.train.split import combine, split
from alpaca_jax.train.step import loss_sums, make_train_step

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2)


def _rows(n=48, seq_len=32, seed=0):
    rng = np.random.RandomState(seed)
    ids, masks = [], []
    for _ in range(n):
        k = rng.randint(6, 20)
        start = rng.randint(2, 60)
        ids.append(np.array([1] + [(start + 3 * i) % 62 + 2 for i in range(k - 1)], np.int32))
        masks.append(np.concatenate([np.zeros(3), np.ones(k - 3)]).astype(np.float32))
    return pack(ids, masks, seq_len)


def _params(seed=0):
    return init_params(CFG, jax.random.PRNGKey(seed))


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_training_reduces_loss_and_keeps_best(tmp_path):
    rows = _rows()
    res = train(_params(), CFG, rows, rows, TrainConfig(steps=30, batch_size=4, lr=3e-3,
                warmup_steps=2, eval_every=10, save_every=10), tmp_path)
    assert res.history[-1]["loss"] < 0.7 * res.history[0]["loss"]
    assert [v["step"] for v in res.val_history] == [10, 20, 30]
    assert res.best_val_loss == min(v["val_loss"] for v in res.val_history)
    assert res.best_params is not None and res.tokens_per_s > 0


def test_only_trainable_leaves_change_and_hold_optimizer_state(tmp_path):
    params = _params()
    pred = lambda path: "lm_head" in path or "final_norm" in path  # noqa: E731
    t, f = split(params, pred)
    assert sum(x is not None for x in jax.tree_util.tree_leaves(t)) == 2
    assert _leaves_equal(combine(t, f), params)
    res = train(params, CFG, _rows(), None, TrainConfig(steps=5, batch_size=4, lr=1e-2,
                warmup_steps=0, save_every=5), tmp_path, trainable=pred)
    assert _leaves_equal(res.params["layers"], params["layers"])
    assert _leaves_equal(res.params["embed"], params["embed"])
    assert not np.array_equal(np.asarray(res.params["lm_head"]), np.asarray(params["lm_head"]))
    opt = optax.adamw(1e-3)
    n_state = len(jax.tree_util.tree_leaves(opt.init(t)))
    assert n_state == 1 + 2 * 2  # count + (mu, nu) for the two trainable leaves only


def test_accumulation_equals_one_big_batch():
    rows = _rows()
    t, f = split(_params(), lambda p: True)
    opt = optax.adamw(1e-3)
    batch = rows.rows(np.arange(8))
    big = {k: v.reshape(1, 8, -1) for k, v in batch.items()}
    small = {k: v.reshape(4, 2, -1) for k, v in batch.items()}
    step = make_train_step(CFG, opt)
    t1, _, m1 = step(jax.tree_util.tree_map(np.array, t), f, opt.init(t), big, 0)
    t2, _, m2 = step(jax.tree_util.tree_map(np.array, t), f, opt.init(t), small, 0)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(t1), jax.tree_util.tree_leaves(t2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_packed_loss_equals_separate_examples():
    params = _params()
    ids = [np.arange(2, 12, dtype=np.int32), np.arange(20, 27, dtype=np.int32)]
    masks = [np.r_[np.zeros(3), np.ones(7)].astype(np.float32),
             np.r_[np.zeros(2), np.ones(5)].astype(np.float32)]
    packed = pack(ids, masks, 24)
    assert len(packed) == 1
    s, n = loss_sums(params, packed.rows(np.arange(1)), CFG)
    sep = [loss_sums(params, pack([i], [m], 24).rows(np.arange(1)), CFG)
           for i, m in zip(ids, masks)]
    np.testing.assert_allclose(float(s), sum(float(x[0]) for x in sep), rtol=1e-5)
    assert float(n) == sum(float(x[1]) for x in sep) == 7 + 5  # every response token is a target


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_the_whole_sequence_loss_and_gradient(tie):
    """`loss_chunk`: the head and log-softmax a few positions at a time (a chunk size that does
    not divide the 23 target positions, packed rows, LoRA adapters with dropout) give the
    whole-sequence NLL sum and gradient."""
    from alpaca_jax.peft import add_lora, is_adapter

    cfg = CFG.replace(tie_embeddings=tie)
    params = add_lora(init_params(cfg, jax.random.PRNGKey(0)), cfg, jax.random.PRNGKey(1),
                      rank=2, alpha=4.0, dropout=0.1)
    params["layers"]["lora"] = jax.tree.map(lambda x: x + 0.05, params["layers"]["lora"])
    ids = [np.arange(2, 14, dtype=np.int32), np.arange(20, 31, dtype=np.int32)]
    masks = [np.r_[np.zeros(3), np.ones(9)].astype(np.float32),
             np.r_[np.zeros(2), np.ones(9)].astype(np.float32)]
    batch = pack(ids, masks, 24).rows(np.arange(1))
    t, f = split(params, is_adapter)
    rng = jax.random.PRNGKey(7)

    # one compiled program per chunk size gives the sum and its gradient (compiling dominates
    # this test's time: about 4 s a program on 2 cores)
    @functools.partial(jax.jit, static_argnums=1)
    @functools.partial(jax.value_and_grad, has_aux=True)
    def sums_and_grad(t, chunk):
        return loss_sums(combine(t, f), batch, cfg, rng=rng, chunk=chunk)

    (s0, n0), g0 = sums_and_grad(t, 0)
    for chunk in (5, 23, 64):
        (s, n), g = sums_and_grad(t, chunk)
        assert float(n) == float(n0) == 18
        np.testing.assert_allclose(float(s), float(s0), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                       atol=1e-6 * float(np.abs(np.asarray(b)).max()))


def test_a_checkpoint_from_before_a_new_train_setting_resumes(tmp_path):
    """A train setting added since a checkpoint was written counts at its default, so a run
    written before `loss_chunk` existed resumes instead of being refused as different."""
    import json

    rows = _rows()
    tc = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, save_every=1,
                     eval_every=100, async_checkpoints=False)
    train(_params(), CFG, rows, None, tc, tmp_path)
    metas = [m for m in (tmp_path / "checkpoints").rglob("*")
             if m.is_file() and "meta" in str(m)]
    edited = 0
    for m in metas:
        try:
            d = json.loads(m.read_text())
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(d, dict) and "train_config" in d:
            d["train_config"].pop("loss_chunk")
            m.write_text(json.dumps(d))
            edited += 1
    assert edited, [str(m) for m in metas]
    res = train(_params(), CFG, rows, None, tc, tmp_path)
    assert res.resumed_from == 2
    with pytest.raises(ValueError, match="different train config"):
        train(_params(), CFG, rows, None, TrainConfig(**{**tc.__dict__, "loss_chunk": 8}),
              tmp_path)


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path):
    params = _params()
    rows = _rows()
    tc = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=0, save_every=2)
    bad = dict(params, final_norm=params["final_norm"].at[0].set(np.nan))
    with pytest.raises(NonFiniteLossError, match=r"step 1: .*not finite.*Last good checkpoint"):
        train(bad, CFG, rows, None, tc, tmp_path)


def _corrupt(step_dir):
    files = [f for f in step_dir.rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(b"\x00" * 7)


def test_corrupt_latest_checkpoint_falls_back_and_replays_exactly(tmp_path):
    rows = _rows()
    tc = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, save_every=2,
                     keep_checkpoints=3, async_checkpoints=False)
    uninterrupted = train(_params(), CFG, rows, None, tc, tmp_path)
    _corrupt(tmp_path / "checkpoints" / "latest" / "4" / "state")
    with pytest.warns(RuntimeWarning, match="step 4 cannot be restored"):
        again = train(_params(), CFG, rows, None, tc, tmp_path)
    assert again.resumed_from == 2 and again.checkpoint_fallbacks[0]["step"] == 4
    assert _leaves_equal(again.params, uninterrupted.params)  # steps 3-4 replayed exactly


def test_no_restorable_checkpoint_is_an_error(tmp_path):
    rows = _rows()
    tc = TrainConfig(steps=2, batch_size=4, warmup_steps=0, save_every=1, keep_checkpoints=2,
                     async_checkpoints=False)
    train(_params(), CFG, rows, None, tc, tmp_path)
    for step in ("1", "2"):
        _corrupt(tmp_path / "checkpoints" / "latest" / step / "state")
    with pytest.raises(CheckpointRestoreError, match="no checkpoint .* can be restored"):
        with pytest.warns(RuntimeWarning):
            train(_params(), CFG, rows, None, tc, tmp_path)


def test_resume_with_a_different_config_is_refused(tmp_path):
    rows = _rows()
    tc = TrainConfig(steps=2, batch_size=4, warmup_steps=0, save_every=2)
    train(_params(), CFG, rows, None, tc, tmp_path)
    with pytest.raises(ValueError, match="different train config"):
        train(_params(), CFG, rows, None, TrainConfig(**{**tc.__dict__, "lr": 1.0}), tmp_path)


def test_a_batch_without_segment_ids_is_one_example_per_row():
    """Unpacked rows may leave `segment_ids` out (causal attention alone): the same loss as
    with one segment per row."""
    params = _params()
    ids = [np.arange(2, 12, dtype=np.int32)]
    masks = [np.r_[np.zeros(3), np.ones(7)].astype(np.float32)]
    batch = pack(ids, masks, 24).rows(np.arange(1))
    assert np.all(np.asarray(batch["segment_ids"])[:, :10] == 1)
    batch = {k: np.asarray(v)[:, :10] for k, v in batch.items()}
    with_seg = loss_sums(params, batch, CFG)
    without = loss_sums(params, {k: v for k, v in batch.items() if k != "segment_ids"}, CFG)
    np.testing.assert_allclose(float(without[0]), float(with_seg[0]), rtol=1e-6)
    assert float(without[1]) == float(with_seg[1]) == 7   # every response token is a target
