"""One JAX cluster of two processes on localhost (2 CPU devices each, gloo collectives) runs
the pipeline on a tiny model with `mesh.data=4`: the same metrics and adapters as one process
with 4 devices; only process 0 writes; a SIGKILL of one process makes the other exit within a
bounded time, and a restart of both resumes from the last checkpoint to the same losses."""
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from apps import app_env
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny4.gguf"
    write_tiny_gguf(tiny_hf_model(vocab=len(tiny_bpe_vocab()[0]), max_pos=512, layers=4), path)
    return path


def _args(gguf, run_dir):
    return [f"model.source={gguf}", "data=synthetic", "data.synthetic_size=80", "data.val_size=8",
            "data.cutoff_len=320", "data.seq_len=320", f"train.steps={STEPS}",
            "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
            "train.warmup_steps=1", "train.lr=3e-3", "logger=disabled", "eval.corpora=[wiki]",
            "eval.max_tokens=256", "eval.ctx_len=64", "eval.tasks=[offline_copa]",
            "eval.task_limit=8", "eval.instruction_samples=2", "eval.prompts=[hi]",
            "eval.max_new_tokens=4", "peft.rank=4", "prune.calib=wiki", "prune.calib_len=32",
            "prune.calib_samples=4", "prune.ratio=null", "prune.n_blocks=1",
            "stages=[prune,heal,evaluate]", "mesh.data=4", f"hydra.run.dir={run_dir}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(gguf, run_dir, n_proc, devices, port=None, tag=""):
    """The processes of one job, each with its log file (`<run_dir>.<tag>p<i>.log`)."""
    env = app_env(JAX_PLATFORMS="cpu",
                  XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    procs = []
    for i in range(n_proc):
        extra = [] if n_proc == 1 else [
            f"distributed.coordinator=localhost:{port}", f"distributed.num_processes={n_proc}",
            f"distributed.process_id={i}", "distributed.heartbeat_timeout_s=10"]
        log = open(f"{run_dir}.{tag}p{i}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, str(ROOT / "experiments" / "pipeline.py"),
             *_args(gguf, run_dir), *extra], env=env, stdout=log, stderr=subprocess.STDOUT),
            Path(log.name)))
    return procs


def _finish(procs, timeout=600):
    for p, log in procs:
        assert p.wait(timeout) == 0, log.read_text()[-3000:]
    return [log.read_text() for _, log in procs]


@pytest.fixture(scope="module")
def one_process(tiny_gguf, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    _finish(_start(tiny_gguf, run, 1, 4))
    return run


def _files(run: Path) -> set:
    return {str(p.relative_to(run)) for p in run.rglob("*")
            if p.is_file() and "checkpoints" not in p.parts and ".hydra" not in p.parts
            and p.name != "app.log"}


def _compare(run, ref):
    a, b = (json.loads((r / "results.json").read_text()) for r in (ref, run))
    assert b["facets"] == a["facets"]
    worst = 0.0
    for k, v in a["metrics"].items():
        if isinstance(v, float) and "time" not in k and not k.endswith("_per_s"):
            assert b["metrics"][k] == pytest.approx(v, rel=1e-5), k
            worst = max(worst, abs(b["metrics"][k] - v) / max(abs(v), 1e-30))
    np.testing.assert_allclose([h["loss"] for h in b["history"]],
                               [h["loss"] for h in a["history"]], rtol=1e-5)
    from safetensors.numpy import load_file
    wa, wb = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (ref, run))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-5, atol=1e-5 * np.abs(wa[k]).max())
    worst_w = max(float(np.abs(wb[k] - wa[k]).max() / np.abs(wa[k]).max()) for k in wa)
    print(f"{run.parent.name}: {len(a['metrics'])} metrics, worst rel {worst:.1e}; losses "
          f"{[round(h['loss'], 6) for h in b['history']]}; {len(wa)} adapter tensors, worst "
          f"max|diff|/max|w| {worst_w:.1e}")
    return b


def test_a_killed_peer_stops_the_other_and_both_resume_to_equal_one_process(
        tiny_gguf, one_process, tmp_path):
    """Two processes of one job: SIGKILL one mid-run and the other stops with a message that says
    so; both restarted resume from the last checkpoint and end equal to one 4-device process
    (the steps before the kill were taken by the two), with only process 0 writing, nothing
    extra and nothing twice. (One test, not an uninterrupted two-process run beside it: each
    multi-process job costs a minute of the suite.)"""
    run = tmp_path / "run"
    port = _free_port()
    procs = _start(tiny_gguf, run, 2, 2, port)
    (p0, log0), (p1, log1) = procs
    deadline = time.time() + 300
    while f"3/{STEPS}" not in log1.read_text():      # past the step-2 checkpoint
        assert time.time() < deadline and p1.poll() is None, log1.read_text()[-3000:]
        time.sleep(0.5)
    p1.send_signal(signal.SIGKILL)
    t_kill = time.time()
    rc = p0.wait(timeout=120)
    assert rc != 0
    out = log0.read_text()
    print(f"survivor exited {time.time() - t_kill:.1f} s after the kill, rc {rc}:\n"
          + "\n".join(out.splitlines()[-6:]))
    # the survivor says it lost its peer: a failed collective becomes PeerLostError, and
    # the coordination service names the task that stopped sending heartbeats (a collective
    # cut mid-message can also make gloo abort the process outright, with its own message)
    assert ("another process of this job died" in out or "heartbeat timeout" in out
            or "gloo" in out.lower()), out[-3000:]
    assert not (run / "results.json").exists()

    logs = _finish(_start(tiny_gguf, run, 2, 2, _free_port(), tag="restart."))
    res = _compare(run, one_process)
    assert res["resumed_from"] in (2, 4)
    assert "2 process(es)" in logs[0] and "wrote" in logs[0]
    assert "wrote" not in logs[1] and "[mesh]" not in logs[1]
    # nothing extra, nothing twice; a resumed heal keeps no stage record of its own (its
    # throughput would be of the resumed part only: recipe/stages.py, heal)
    assert _files(run) == _files(one_process) - {"stages/heal.json"}


def test_only_process_0_writes_json(tmp_path, monkeypatch):
    import jax

    from alpaca_jax.provenance import write_json_atomic
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert not (tmp_path / "x.json").exists()
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
