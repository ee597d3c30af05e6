"""The Hydra entry point end to end on a tiny model, and config typos rejected before compute."""
import json
import subprocess
import sys
from pathlib import Path

from apps import app_env, run_app_here
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent


def _run(*overrides, cwd):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "evaluate.py"), *overrides],
                          cwd=cwd, env=app_env(), capture_output=True, text=True, timeout=300)


def test_evaluate_writes_results_json(tmp_path):
    write_tiny_gguf(tiny_hf_model(vocab=len(tiny_bpe_vocab()[0])), tmp_path / "tiny.gguf")
    (tmp_path / "corpus.txt").write_text("the hello tell the hello\n\n" * 40)
    import numpy as np
    np.save(tmp_path / "ids.npy", np.random.RandomState(0).randint(0, 100, (4, 50)))
    run_dir = tmp_path / "run"
    proc = _run(f"model.source={tmp_path / 'tiny.gguf'}",
                f"eval.corpora=[{tmp_path / 'corpus.txt'},{tmp_path / 'ids.npy'}]",
                "eval.ctx_len=32", "eval.max_tokens=200", "eval.prompts=[hi]",
                "eval.max_new_tokens=4", "eval.tasks=[offline_copa]", "eval.task_limit=3",
                f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    ppl = res["metrics"][f"final/ppl_{tmp_path / 'corpus.txt'}"]
    assert 1.0 < ppl < 1e4
    assert 1.0 < res["metrics"]["final/ppl_ids"] < 1e4
    assert res["config"]["eval"]["ctx_len"] == 32
    assert res["git_sha"] and "jax" in res["versions"] and len(res["samples"]["final"]) == 1
    assert 0 <= res["metrics"]["final/copa/acc"] <= 1 and res["metrics"]["final/copa/acc_stderr"] > 0
    assert res["harness"]["tasks"]["copa"]["n"] == 3 and res["harness"]["limit"] == 3


def test_typo_in_override_fails_before_compute(tmp_path):
    code, _, err = run_app_here("evaluate", "eval.ctx_lenn=32", f"hydra.run.dir={tmp_path}")
    assert code != 0 and "ctx_lenn" in err
    code, _, err = run_app_here("evaluate", "eval.ctx_len=many", f"hydra.run.dir={tmp_path}")
    assert code != 0 and "ctx_len" in err


def test_unknown_corpus_fails_before_loading_the_model(tmp_path):
    code, _, err = run_app_here("evaluate", "eval.corpora=[no_such_corpus.txt]",
                                "model.source=not-a-model", f"hydra.run.dir={tmp_path}")
    assert code != 0 and "no_such_corpus.txt" in err
