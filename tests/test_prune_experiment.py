"""experiments/prune.py end to end on a tiny 4-block model: score, prune, heal, evaluate, resume."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from apps import app_env, run_app_here
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
ENV = app_env()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny4.gguf"
    write_tiny_gguf(tiny_hf_model(vocab=len(tiny_bpe_vocab()[0]), max_pos=512, layers=4), path)
    return path


def _cmd(gguf, run_dir, *extra, steps=4):
    return [sys.executable, str(ROOT / "experiments" / "prune.py"), f"model.source={gguf}",
            "data=synthetic", "data.synthetic_size=80", "data.val_size=8", "data.cutoff_len=320",
            "data.seq_len=320", f"train.steps={steps}", "train.batch_size=4", "train.save_every=2",
            "train.eval_every=2", "train.warmup_steps=1", "train.lr=3e-3", "logger=disabled",
            "eval.ppl_tokens=128", "eval.ctx_len=32", "eval.samples=1", "eval.max_new_tokens=4",
            "peft.rank=4", "prune.calib=wiki", "prune.calib_len=32", "prune.calib_samples=4",
            f"hydra.run.dir={run_dir}", *extra]


def _run(cmd, timeout=600):
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_prune_heal_evaluate_and_resume(tiny_gguf, tmp_path):
    proc = _run(_cmd(tiny_gguf, tmp_path, "prune.ratio=0.25"))   # 25% of 4 blocks: 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    bs = json.loads((tmp_path / "block_scores.json").read_text())
    assert bs["criterion"] == "ppl" and len(bs["scores"]) == 4 and bs["calibration_shape"] == [4, 32]
    assert bs["pruned"] == [bs["order"][0]] and bs["scores"][bs["order"][0]] == min(bs["scores"])
    assert bs["base_ppl"] > 1 and bs["scoring_time_s"] > 0
    res = json.loads((tmp_path / "results.json").read_text())
    m = res["metrics"]
    assert res["stage"] == "pipeline" and res["recipe"]["prune"]["pruned"] == bs["pruned"]
    assert res["recipe"]["finetune"] == "lora"
    assert m["params"] < m["params_base"]
    for tag in ("baseline", "after_prune", "final"):
        assert f"{tag}/ppl_wiki" in m and f"{tag}/val_loss" in m
    assert m["final/val_loss"] < m["after_prune/val_loss"]      # healing trains the pruned model
    state = ocp.StandardCheckpointer().restore(
        (tmp_path / "checkpoints" / "latest" / "4" / "state").resolve())["trainable"]
    assert np.asarray(state["layers"]["lora"]["wq"]["a"]).shape[0] == 3   # adapters: 3 blocks

    again = _run(_cmd(tiny_gguf, tmp_path, "prune.ratio=0.25"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing block scores" in again.stdout
    res2 = json.loads((tmp_path / "results.json").read_text())
    assert res2["resumed_from"] == 4 and res2["recipe"]["prune"]["scores"] == bs["scores"]


def test_taylor_plus_protection_and_no_healing(tiny_gguf, tmp_path):
    # the paper's "+" keeps the first four and last two blocks: nothing of 4 is removable
    code, _, err = run_app_here("prune", *_cmd(tiny_gguf, tmp_path / "a", "prune=taylor_plus_20pct",
                                               "prune.ratio=0.25")[2:])
    assert code != 0 and "cannot remove 1 of 4 blocks: only 0 are removable (keep_first=4" in err
    assert not (tmp_path / "a" / "block_scores.json").exists()
    proc = _run(_cmd(tiny_gguf, tmp_path / "b", "prune=taylor_plus_20pct", "prune.ratio=0.25",
                     "prune.keep_first=1", "prune.keep_last=0", "prune.heal=false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    bs = res["recipe"]["prune"]
    assert bs["criterion"] == "taylor+" and bs["keep_first"] == 1 and 0 not in bs["order"]
    assert res["recipe"]["finetune"] == "none" and not res["history"]
    assert "heal/best_val_loss" not in res["metrics"] and "final/val_loss" in res["metrics"]


@pytest.mark.parametrize("override,message", [
    ("prune.criterion=entropy", "unknown pruning criterion 'entropy'"),
    ("prune.n_blocks=2", "set exactly one of prune.n_blocks and prune.ratio"),
    ("prune.calib=missing.npy", "prune.calib=missing.npy: no such file"),
    ("prune.criterion=magnitude prune.iterative=true", "re-scores with the ppl criterion"),
])
def test_bad_prune_settings_fail_before_loading_anything(tmp_path, override, message):
    code, _, err = run_app_here("prune", *override.split(), "model.source=not-a-model",
                                "logger=disabled", f"hydra.run.dir={tmp_path}")
    assert code != 0 and message in err, err[-1500:]
