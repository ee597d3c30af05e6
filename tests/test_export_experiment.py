"""experiments/export.py and the run-model rebuild on tiny models: a QAT run ships its trained
grid; a pruned LoRA run is rebuilt (drop, then adapter) and exported; parity, greedy answers and
the llama.cpp benchmark land in results.json; bad input fails before any model is loaded."""
import json
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from alpaca_jax import forward, load_model
from alpaca_jax.export.runtime import llama_logits
from alpaca_jax.io.run_model import RunFormatError
from alpaca_jax.recipe.replay import load_run_model
from alpaca_jax.peft import add_lora, save_peft
from alpaca_jax.peft.lora import merge
from alpaca_jax.prune import drop_layers
from alpaca_jax.quant import QuantSpec, quantize_params
from alpaca_jax.quant.formats import to_ggml_bytes
from apps import app_env, run_app_here
from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model
from test_forward_parity import assert_close_logits

ROOT = Path(__file__).resolve().parent.parent
ENV = app_env()
SMALL = ["export.threads=[1]", "export.repeats=1", "export.gen_tokens=4",
         "export.prompt_tokens=16", "export.parity_tokens=32", "export.max_new_tokens=6",
         "export.prompts=[hello there,what is it]"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_tiny_gguf(tiny_hf_model(vocab=len(tiny_bpe_vocab()[0]), max_pos=512, layers=3), path)
    return path


def _run(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_a_qat_run_is_exported_on_its_trained_grid_and_benchmarked(tiny_gguf, tmp_path):
    run = tmp_path / "qat"
    proc = _run("finetune.py", f"model.source={tiny_gguf}", "quant=qat_q4_0", "data=synthetic",
                "data.synthetic_size=80", "data.val_size=8", "data.cutoff_len=320",
                "data.seq_len=320", "train.steps=4", "train.batch_size=4", "train.eval_every=2",
                "train.warmup_steps=1", "train.lr=3e-3", "logger=disabled", "eval.ppl_tokens=64",
                "eval.ctx_len=32", "eval.samples=1", "eval.max_new_tokens=2",
                f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, cfg, tok, recipe = load_run_model(run)        # the best checkpoint, full FT
    base, _, _ = load_model(tiny_gguf)
    assert recipe["finetune"] == "full"
    assert not np.array_equal(np.asarray(params["layers"]["wq"]), np.asarray(base["layers"]["wq"]))

    out = tmp_path / "export"
    # the "KL vs float" column against the model before QAT, not the run's own float weights
    proc = _run("export.py", f"run_dir={run}", "export=q4_0", *SMALL, f"hydra.run.dir={out}",
                f"export.float_reference={tiny_gguf}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Q4_0 |" in proc.stdout                       # the table is printed
    res = json.loads((out / "results.json").read_text())
    e = res["exports"]["Q4_0"]
    assert res["stage"] == "pipeline" and e["qat_grid"] is True
    # the file holds exactly the codes of the trained model's quantize_params
    codes = quantize_params(params, QuantSpec("q4_0"), cfg)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model-q4_0.gguf")).tensors}
    for i in range(cfg.num_layers):
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.{i}.ffn_down.weight"].data),
                                      to_ggml_bytes(codes["layers/w_down"])[i])
    # tiny model: llama.cpp's quantized path is reproduced to float rounding
    assert e["parity"]["kl_mean"] < 1e-6 and e["parity"]["argmax_agreement"] == 1.0
    from alpaca_jax.export.report import wiki_ids
    from alpaca_jax.export.runtime import kl_stats
    ids = wiki_ids(tok, 32)
    before = np.asarray(forward(base, np.array([ids]), cfg)[0][0])
    theirs = llama_logits(out / "model-q4_0.gguf", ids)
    assert e["parity"]["float_reference"] == str(tiny_gguf)
    np.testing.assert_allclose(e["parity"]["kl_float"], kl_stats(theirs, before)["kl_mean"],
                               rtol=1e-3)
    assert e["parity"]["kl_float"] > 100 * e["parity"]["kl_mean"]   # not the file's own model
    assert all(a["identical"] for a in e["greedy"]) and len(e["greedy"]) == 2
    (b,) = e["bench"]
    assert b["threads"] == 1 and b["prompt_tok_s"] > 0 and b["gen_tok_s"] > 0
    assert b["peak_rss_mb"] > b["baseline_rss_mb"] > 0 and b["bound_gen_tok_s"] > 0
    assert e["bytes_per_token"] == e["weight_bytes"] + e["kv_bytes"]
    assert res["metrics"]["bench/jax_fp32/gen_tok_s"] > 0 and res["metrics"]["bench/copy_gb_s_1t"] > 0


def test_a_pruned_lora_run_is_rebuilt_and_exported(tiny_gguf, tmp_path):
    """A prune run's recipe (blocks removed, adapter on the pruned model) rebuilds to the model
    it trained, and its F32 export runs in llama.cpp with that model's logits."""
    params, cfg, tok = load_model(tiny_gguf)
    pruned, pcfg = drop_layers(params, cfg, [1])
    p = add_lora(pruned, pcfg, jax.random.PRNGKey(0), rank=2, alpha=4.0, targets="all")
    p["layers"]["lora"] = jax.tree.map(lambda x: x + 0.02, p["layers"]["lora"])
    run = tmp_path / "run"
    adapter = save_peft(p, pcfg, run / "adapter", base_model_name_or_path=str(tiny_gguf))
    (run / "results.json").write_text(json.dumps({"stage": "prune", "recipe": {
        "base": str(tiny_gguf), "finetune": "lora", "prune": {"pruned": [1]},
        "adapter_dir": str(tmp_path / "moved-away")}}))   # falls back to the run's adapter/
    got, gcfg, _, _ = load_run_model(run)
    assert gcfg.num_layers == 2 and adapter.is_dir()
    ids = np.arange(3, 19)[None]
    ref = np.asarray(forward(merge(p), ids, pcfg)[0][0])
    assert_close_logits(np.asarray(forward(merge(got), ids, gcfg)[0][0]), ref)

    out = tmp_path / "export"
    proc = _run("export.py", f"run_dir={run}", "export=files", "export.qtypes=[F32]",
                f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_logits(llama_logits(out / "model-f32.gguf", list(ids[0])), ref)


@pytest.mark.parametrize("args, message", [
    (["export.qtypes=[Q3_K]"], "export.qtypes: 'Q3_K' is not one of"),
    (["export.qtype=Q8_0"], "export.qtype"),                            # a key that does not exist
    (["export.threads=[0]"], "export.threads must be"),
    (["run_dir=/nonexistent/run"], "results.json: no such file"),
    (["drop_blocks=[99]", "export=files"], "block indices [99] are outside [0, 3)"),
    (["export.float_reference=/nonexistent/model"],
     "export.float_reference='/nonexistent/model' cannot be loaded"),
])
def test_bad_export_settings_fail_clearly(tiny_gguf, tmp_path, args, message):
    code, _, err = run_app_here("export", f"model.source={tiny_gguf}",
                                f"hydra.run.dir={tmp_path}", *args)
    assert code != 0 and message in err, err[-2000:]
    assert not list(tmp_path.glob("*.gguf"))


def test_malformed_run_dirs_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text("{not json")
    with pytest.raises(RunFormatError, match="a/results.json: not valid JSON"):
        load_run_model(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps({"stage": "evaluate"}))
    with pytest.raises(RunFormatError, match="no 'recipe' object"):
        load_run_model(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps({"recipe": {
        "base": "x", "finetune": "lora", "prune": {"pruned": "3"}}}))
    with pytest.raises(RunFormatError, match="no list of removed blocks"):
        load_run_model(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.json").write_text(json.dumps({"recipe": {
        "base": "smollm2-135m-instruct", "finetune": "full"}}))
    with pytest.raises(RunFormatError, match="holds no checkpoint"):
        load_run_model(tmp_path / "d")         # before the base model loads (io/run_model.py)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "results.json").write_text(json.dumps({"recipe": {
        "base": "smollm2-135m-instruct", "finetune": "lora", "adapter_dir": "/moved/away"}}))
    with pytest.raises(RunFormatError, match="but no adapter directory"):
        load_run_model(tmp_path / "e")
