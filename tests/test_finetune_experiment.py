"""experiments/finetune.py end to end on a tiny model: SIGKILL + restart == uninterrupted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from apps import app_env, run_app_here
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12  # killed after the checkpoint of step 6, resumed to the end


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_tiny_gguf(tiny_hf_model(vocab=len(tiny_bpe_vocab()[0]), max_pos=512), path)
    return path


def _cmd(gguf, run_dir, *extra, steps=STEPS):
    return [sys.executable, str(ROOT / "experiments" / "finetune.py"), f"model.source={gguf}",
            "data=synthetic", "data.synthetic_size=160", "data.val_size=16", "data.cutoff_len=320",
            "data.seq_len=320", f"train.steps={steps}", "train.batch_size=4", "train.save_every=2",
            "train.eval_every=6", "train.warmup_steps=2", "train.lr=1e-3", "logger=disabled",
            "eval.ppl_tokens=128", "eval.ctx_len=32", "eval.samples=2", "eval.max_new_tokens=4",
            f"hydra.run.dir={run_dir}", *extra]


def _final_state(run_dir):
    restored = ocp.StandardCheckpointer().restore(
        (run_dir / "checkpoints" / "latest" / str(STEPS) / "state").resolve())
    return restored["trainable"]


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}/{k}") if isinstance(v, dict) else {f"{prefix}/{k}": v})
    return out


def test_sigkill_and_restart_equals_uninterrupted_run(tiny_gguf, tmp_path):
    env = app_env()
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.run(_cmd(tiny_gguf, ref_dir), env=env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(_cmd(tiny_gguf, run_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = run_dir / "checkpoints" / "latest" / "6"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "results.json").exists()

    again = subprocess.run(_cmd(tiny_gguf, run_dir), env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    ref_res = json.loads((ref_dir / "results.json").read_text())
    assert res["resumed_from"] is not None and 6 <= res["resumed_from"] < STEPS
    assert [h["loss"] for h in res["history"]] == [h["loss"] for h in ref_res["history"]]
    assert res["metrics"]["heal/best_val_loss"] == ref_res["metrics"]["heal/best_val_loss"]
    a, b = _flat(_final_state(run_dir)), _flat(_final_state(ref_dir))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert res["metrics"]["final/val_loss"] < res["metrics"]["baseline/val_loss"]


def test_finetune_config_typos_fail_before_compute(tmp_path):
    for bad, name in [("train.lrr=1", "lrr"), ("data=nonexistent_group", "nonexistent_group"),
                      ("train.steps=many", "steps")]:
        code, _, err = run_app_here("finetune", bad, f"hydra.run.dir={tmp_path}")
        assert code != 0 and name in err, (bad, err[-500:])


def test_malformed_data_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "c"}]))
    code, _, err = run_app_here("finetune", f"data.source={bad}", "model.source=not-a-model",
                                "logger=disabled", f"hydra.run.dir={tmp_path / 'run'}")
    assert code != 0 and "bad.json: record 1 has no string field 'instruction'" in err


def test_lora_finetune_trains_adapters_only_writes_a_peft_adapter_and_logs_offline(tiny_gguf,
                                                                                   tmp_path):
    """peft=lora_r8 end to end: the recipe's settings land in the tree, only adapters are
    checkpointed, the saved PEFT adapter reloads to the run's final model, W&B logs offline
    into the run dir, and resuming the run directory with another adapter config is refused
    before any state is restored."""
    from alpaca_jax import forward, load_model
    from alpaca_jax.peft import load_peft

    env = {k: v for k, v in app_env().items() if k not in ("WANDB_MODE", "WANDB_DIR")}
    cmd = _cmd(tiny_gguf, tmp_path, "peft=lora_r8", "peft.rank=4", "train.eval_every=2",
               "train.lr=3e-3", "logger=wandb_offline", "logger.group=test", steps=4)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["train"]["lr"] == 3e-3  # the command line beats the preset's 1e-4
    assert res["recipe"]["finetune"] == "lora"
    assert res["recipe"]["adapter"]["q"] == {"method": "lora", "rank": 4, "scale": 4.0,
                                             "dropout": pytest.approx(0.05)}
    assert 0 < res["metrics"]["trainable_params"] < res["metrics"]["params"] / 5
    state = _flat(ocp.StandardCheckpointer().restore(
        (tmp_path / "checkpoints" / "latest" / "4" / "state").resolve())["trainable"])
    state = {k: v for k, v in state.items() if v is not None}  # frozen leaves: placeholders
    assert state and all("/lora/" in k for k in state), sorted(state)[:5]
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 16.0 and len(conf["target_modules"]) == 7

    params, cfg, _ = load_model(str(tiny_gguf))
    loaded = load_peft(params, cfg, tmp_path / "adapter")
    best = _flat(ocp.StandardCheckpointer().restore(
        next((tmp_path / "checkpoints" / "best").glob("*/state")).resolve())["trainable"])
    best = {k: v for k, v in best.items() if v is not None}
    assert best
    for k, v in best.items():  # the adapter written is the best checkpoint's
        _, _, _, name, leaf = k.split("/")
        np.testing.assert_allclose(np.asarray(loaded["layers"]["lora"][name][leaf]),
                                   np.asarray(v), rtol=0, atol=0, err_msg=k)
    tokens = np.arange(12)[None] % cfg.vocab_size
    assert np.abs(np.asarray(forward(loaded, tokens, cfg)[0])
                  - np.asarray(forward(params, tokens, cfg)[0])).max() > 0

    code, _, err = run_app_here("finetune", *_cmd(tiny_gguf, tmp_path, "peft=dora_r8",
                                                  "peft.rank=4", "train.eval_every=2",
                                                  "train.lr=3e-3", steps=4)[2:])
    assert code != 0 and "written by a different run" in err, err[-2000:]
