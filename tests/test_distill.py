"""Healing by distillation (alpaca_jax/train/distill.py): the KD loss and its gradient against a
torch reference on packed rows (whole and chunked), zero at teacher == student, QAT from a float
teacher resumed after SIGKILL, and the errors for bad settings. XLA compiles dominate the cost,
so each check reuses a compiled function where it can; LoRA distils in the pipeline sweep
(tests/test_pipeline.py)."""
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpaca_jax import ModelConfig, init_params
from alpaca_jax.data.batching import pack
from alpaca_jax.prune import drop_layers
from alpaca_jax.quant import FakeQuant, QuantSpec
from alpaca_jax.train.distill import (DistillConfig, Objective, check_distill, check_teacher,
                                      distill_sums, make_teacher, teacher_outputs)

TESTS = Path(__file__).resolve().parent
CFG3 = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=2)


@functools.lru_cache(maxsize=1)
def _base():
    return init_params(CFG3, jax.random.PRNGKey(0))


def _segments(seed=0, vocab=97):
    """Three examples (prompt tokens masked out) packed into two rows of 20: row 0 holds two."""
    rng = np.random.RandomState(seed)
    ids = [rng.randint(3, vocab, k).astype(np.int32) for k in (9, 8, 14)]
    masks = [np.r_[np.zeros(p), np.ones(len(x) - p)].astype(np.float32)
             for x, p in zip(ids, (3, 2, 5))]
    return ids, masks, pack(ids, masks, 20)


def _torch_reference(student, teacher, ids, masks, kind, tau, weight):
    """The objective on each example run alone (no packing), by torch autograd: the loss and
    the student's gradients by HF parameter name."""
    import torch
    import torch.nn.functional as F

    student.zero_grad()
    total, count = 0.0, 0.0
    for x, m in zip(ids, masks):
        t = torch.as_tensor(x[None].astype(np.int64))
        s_logits = student(t).logits[0, :-1]
        with torch.no_grad():
            t_logits = teacher(t).logits[0, :-1]
        kd = F.kl_div(F.log_softmax(s_logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                      log_target=True, reduction="none").sum(-1) * tau ** 2   # Hinton's tau^2
        nll = F.cross_entropy(s_logits, t[0, 1:], reduction="none")
        per = kd if kind == "kd" else weight * kd + (1 - weight) * nll
        mask = torch.as_tensor(m[1:])
        total = total + (per * mask).sum()
        count += float(mask.sum())
    loss = total / count
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy() for n, p in student.named_parameters()}, count


@pytest.mark.parametrize("kind, tau, weight, chunk", [("kd", 2.0, 0.0, 0), ("kd+sft", 0.5, 0.3, 6)])
def test_kd_loss_and_gradient_equal_torch_and_vanish_at_teacher_equal_student(kind, tau, weight,
                                                                              chunk):
    """Two different tiny models (HF, converted) as teacher and student on packed rows: loss
    and every gradient as torch computes them example by example. Then the student as its own
    teacher: zero loss and zero gradient, while the NLL term stays (same compiled function)."""
    from alpaca_jax.io.hf import params_from_hf
    from hf_reference import tiny_hf_model, to_jax

    teacher_hf, student_hf = tiny_hf_model(seed=0), tiny_hf_model(seed=1)
    t_params, cfg = to_jax(teacher_hf)
    s_params, _ = to_jax(student_hf)
    ids, masks, rows = _segments()
    assert len(rows) == 2 and rows.segment_ids[0].max() == 2     # two examples share row 0
    batch = rows.rows(np.arange(2))
    obj = Objective(kind, tau, weight, chunk, cfg)

    @jax.jit
    def loss_and_grads(p, tp):
        def loss(p):
            s, n, parts = distill_sums(p, tp, teacher_outputs(tp, batch, obj), batch, cfg, obj)
            return s / n, (n, parts)
        return jax.value_and_grad(loss, has_aux=True)(p)

    (got, (n, parts)), grads = loss_and_grads(s_params, t_params)
    ref, ref_grads, count = _torch_reference(student_hf, teacher_hf, ids, masks, kind, tau,
                                             weight)
    assert float(n) == count == 6 + 6 + 9
    assert float(parts["kd"]) > 0.1 * float(n)     # the two models differ: a loss to match
    np.testing.assert_allclose(float(got), ref, rtol=2e-5)
    ref_tree = params_from_hf(ref_grads, cfg)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree_util.tree_leaves(ref_tree)):
        g, r = np.asarray(g), np.asarray(r)
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-5 * max(1.0, np.abs(r).max()),
                                   err_msg=jax.tree_util.keystr(path))

    (same, (_, parts)), grads = loss_and_grads(s_params, s_params)
    assert float(parts["kd"]) < 1e-6 * float(n) and float(parts["nll"]) > float(n)
    if kind == "kd":
        assert abs(float(same)) < 1e-6
        assert max(float(np.abs(np.asarray(g)).max())
                   for g in jax.tree_util.tree_leaves(grads)) < 1e-6


def _resume_setup():
    teacher = dict(_base())
    teacher["lm_head"] = 30.0 * teacher["lm_head"]   # confident logits: something to distil
    student, cfg = drop_layers(teacher, CFG3, [1])   # the "pruned" model, distilled from whole
    rng = np.random.RandomState(0)
    ids = [np.r_[1, (rng.randint(2, 60) + 3 * np.arange(k - 1)) % 62 + 2].astype(np.int32)
           for k in rng.randint(6, 20, 48)]
    masks = [np.r_[np.zeros(3), np.ones(len(x) - 3)].astype(np.float32) for x in ids]
    return student, cfg, teacher, pack(ids, masks, 32)


def _train(out_dir, tau=2.0, log=None):
    from alpaca_jax.train.loop import TrainConfig, train

    student, cfg, t_params, rows = _resume_setup()
    teacher = make_teacher(DistillConfig(objective="kd", tau=tau), t_params,
                           CFG3, cfg, name="unpruned")
    tc = TrainConfig(steps=8, batch_size=2, accum_steps=2, lr=1e-3, warmup_steps=1,
                     save_every=2, async_checkpoints=False)   # step 4 is on disk in step 5
    qat = FakeQuant.from_spec(QuantSpec("q4_0"), cfg)   # a Q4_0 student, a float teacher
    return train(student, cfg, rows, None, tc, out_dir, teacher=teacher, materialize=qat,
                 log=log)


def _killed_run(out_dir):
    """Run in a subprocess by the SIGKILL test: it stops in step 5 (the step-4 checkpoint
    written) until it is killed, so the kill comes neither too early nor too late."""
    jax.config.update("jax_default_matmul_precision", "highest")   # as tests/conftest.py

    def log(entry):
        if entry["step"] == 5:
            (Path(out_dir) / "in_step_5").touch()
            time.sleep(3600)
    _train(Path(out_dir), log=log)


def test_qat_from_a_float_teacher_resumes_after_sigkill_with_the_same_losses(tmp_path):
    """kd (tau 2) of a Q4_0 QAT student with one block pruned, from the float unpruned
    model, two micro-batches per step: killed after its step-4 checkpoint, restarted, it
    reproduces the uninterrupted run's losses and weights exactly."""
    run_dir = tmp_path / "killed"
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_distill; " \
           f"test_distill._killed_run({str(run_dir)!r})"
    err = tmp_path / "killed.stderr"
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=err.open("w"))
    ref = _train(tmp_path / "ref")        # meanwhile (the two compile on both cores)
    assert ref.history[-1]["kd"] < 0.5 * ref.history[0]["kd"]   # it does learn from the teacher
    marker = run_dir / "in_step_5"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, err.read_text()[-2000:]
    again = _train(run_dir)
    assert again.resumed_from == 4
    for key in ("loss", "nll", "kd"):
        assert [h[key] for h in again.history] == [h[key] for h in ref.history], key
    for a, b in zip(jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="written by a different run"):
        _train(run_dir, tau=1.0)           # another objective does not resume this one


def test_bad_objective_settings_are_named():
    for dc, msg in [(DistillConfig(objective="kdd"), "distill.objective='kdd' is not one of"),
                    (DistillConfig(objective="kd", teacher="none"), "needs a teacher"),
                    (DistillConfig(objective="kd", tau=0.0), "distill.tau must be > 0"),
                    (DistillConfig(objective="kd+sft", weight=1.5), "distill.weight must lie"),
                    (DistillConfig(objective="kd", teacher="stage:quantize"),
                     "a stage teacher is one of stage:load, stage:prune")]:
        with pytest.raises(ValueError, match=msg):
            check_distill(dc)
    check_distill(DistillConfig(objective="sft", tau=0.0))   # sft ignores the KD settings
    from alpaca_jax.recipe.checks import check_settings
    from alpaca_jax.recipe.settings import Job as PipelineJob

    job = PipelineJob(stages=["heal", "prune"],
                      distill=DistillConfig(objective="kd", teacher="stage:prune"))
    with pytest.raises(ValueError, match=r"stage:prune: stages=\['heal', 'prune'\] has no prune "
                                         r"stage before heal"):
        check_settings(job)
    with pytest.raises(ValueError, match="distill.objective='kd-sft' is not one of"):
        check_settings(PipelineJob(distill=DistillConfig(objective="kd-sft")))
    small = CFG3.replace(vocab_size=48)
    with pytest.raises(ValueError, match="distill.teacher=other: its vocabulary has 48 tokens, "
                                         "the student's 64"):
        check_teacher("other", small, None, CFG3, None)
    a, b = SimpleNamespace(pieces=["<s>", "a", "b"]), SimpleNamespace(pieces=["<s>", "a", "c"])
    with pytest.raises(ValueError, match=r"tokenizer differs .*\(token id 2: 'b' vs 'c'\)"):
        check_teacher("other", CFG3, a, CFG3, b)


def test_a_bf16_student_gets_a_bf16_teacher():
    base = init_params(CFG3, jax.random.PRNGKey(0))
    t = make_teacher(DistillConfig(objective="kd"), base, CFG3,
                     CFG3.replace(compute_dtype="bfloat16"))
    assert t.params["layers"]["wq"].dtype == jnp.bfloat16
    assert t.objective.teacher_cfg.compute_dtype == "bfloat16"
    assert t.record["teacher_dtype"] == "bfloat16" and t.record["teacher_layers"] == 3


def test_runs_from_before_the_setting_read_as_sft_in_the_tables():
    from analysis.collect import row_of

    old = {"stage": "pipeline", "metrics": {}, "facets": {"heal": "lora", "quant": "none"}}
    assert row_of(old, Path("a"))["objective"] == "sft"
    unhealed = {"stage": "pipeline", "metrics": {}, "facets": {"heal": "none"}}
    assert row_of(unhealed, Path("b"))["objective"] == "none"
    new = {"stage": "pipeline", "metrics": {}, "facets": {"heal": "lora", "objective": "kd"}}
    assert row_of(new, Path("c"))["objective"] == "kd"
