"""The ablation pipeline end to end on a tiny model: a two-config sweep through every stage and
the analysis into a table that matches the runs; resume; stage-order and sweep errors; the
analysis's tables, sections and malformed inputs."""
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.collect import ResultsError, collect
from analysis.report import replace_section
from analysis.tables import latex, markdown, summarize
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


def _args(gguf):
    return [f"model.source={gguf}", "data=synthetic", "data.synthetic_size=80", "data.val_size=8",
            "data.cutoff_len=320", "data.seq_len=320", "train.steps=4", "train.batch_size=4",
            "train.eval_every=2", "train.save_every=2", "train.warmup_steps=1", "train.lr=3e-3",
            "logger=disabled", "eval.corpora=[wiki]", "eval.max_tokens=256", "eval.ctx_len=64",
            "eval.tasks=[offline_copa,offline_wsc273,offline_lambada_openai]",
            "eval.task_limit=8", "eval.instruction_samples=2", "eval.prompts=[hi]",
            "eval.max_new_tokens=4", "peft.rank=4", "prune.calib=wiki", "prune.calib_len=32",
            "prune.calib_samples=4", "export.threads=[1]", "export.repeats=1",
            "export.gen_tokens=4", "export.prompt_tokens=16", "export.parity_tokens=32",
            "export.max_new_tokens=4", "export.prompts=[hello]"]


def _pipeline(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "pipeline.py"), *args],
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def _report(*args):
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep(tiny_gguf, tmp_path_factory):
    """`-m` over two seeds, every stage: baseline, prune, heal (LoRA), quantize (PTQ Q8_0),
    evaluate, export, benchmark. (Seeds, not two pruning ratios: the second job has the
    first's shapes, so it compiles nothing new and costs a third of the first.)"""
    d = tmp_path_factory.mktemp("sweep")
    proc = _pipeline("-m", *_args(tiny_gguf), "quant=ptq_q8_0", "prune.ratio=0.25", "seed=0,1",
                     f"hydra.sweep.dir={d}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return d


def test_a_sweep_runs_every_stage_and_the_analysis_tables_it(sweep, tmp_path):
    runs = [json.loads((sweep / i / "results.json").read_text()) for i in ("0", "1")]
    for r in runs:
        assert r["stage"] == "pipeline" and r["stages"] == [
            "baseline", "prune", "heal", "quantize", "evaluate", "export", "benchmark"]
        m = r["metrics"]
        for key in ("baseline/ppl_wiki", "final/ppl_wiki", "final/copa/acc", "final/copa/acc_stderr",
                    "final/wsc273/acc", "final/lambada_openai/acc", "final/val_loss",
                    "final/exact_match", "heal/best_val_loss", "export/Q8_0/file_mb",
                    "bench/Q8_0/gen_tok_s_1t", "bench/jax_fp32/gen_tok_s"):
            assert key in m, key
        # the file is the JAX model: exact but for activation-rounding flips (a last-bit
        # difference in a matmul input moves an 8-bit code: 0.03 on 3 of 32 logit rows of the
        # pruned run on an AVX2 CPU, KL 4e-6; tests/test_export.py checks the emulation itself)
        assert r["exports"]["Q8_0"]["parity"]["kl_mean"] < 1e-4
        assert r["facets"]["quant"] == "ptq_q8_0" and r["facets"]["heal"] == "lora"
        h = r["harness"]                      # lm-eval's provenance beside the numbers
        assert h["lm_eval_version"].startswith("0.4") and h["limit"] == 8
        assert h["tasks"]["copa"] == {"task": "offline_copa", "version": 1.0, "n_shot": 0,
                                      "n": 8, "n_total": 100, "output_type": "multiple_choice"}
    assert [(r["facets"]["seed"], r["facets"]["pruned_blocks"]) for r in runs] == [(0, 1), (1, 1)]
    assert all(r["metrics"]["params"] < r["metrics"]["params_base"] for r in runs)
    assert runs[0]["history"] != runs[1]["history"]      # the seed reached the adapters and data

    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    proc = _report(str(sweep), "--name", "mini", "--results", str(results), "--latex",
                   str(tmp_path / "t.tex"), "--plots", str(tmp_path / "plots"), "--archive",
                   str(tmp_path / "archive"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Results\n\nkept text\n") and "<!-- analysis:mini begin -->" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| ppl")]   # seeds pooled
    header = [c.strip() for c in next(line for line in text.splitlines()
                                      if line.startswith("| criterion")).strip("|").split("|")]
    cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))

    def pooled(key, fmt, se=None):     # mean ± std over the two seeds (± mean stderr)
        vals = [r["metrics"][key] for r in runs]
        out = f"{fmt(statistics.fmean(vals))} ± {fmt(statistics.stdev(vals))}"
        return out if se is None else \
            f"{out} ({fmt(statistics.fmean(r['metrics'][se] for r in runs))})"
    pct = lambda v: f"{100 * v:.1f}"   # noqa: E731
    assert cells["pruned_blocks"] == "1" and cells["n"] == "2"
    assert cells["wiki ppl"] == pooled("final/ppl_wiki", lambda v: f"{v:.2f}")
    assert cells["COPA"] == pooled("final/copa/acc", pct, se="final/copa/acc_stderr")
    assert cells["0-shot avg"] == pooled("final/zeroshot_avg", pct)
    assert cells["params (M)"] == pooled("params", lambda v: f"{v / 1e6:.1f}")
    assert cells["llama.cpp tok/s 1t"] == pooled("bench/Q8_0/gen_tok_s_1t", lambda v: f"{v:.0f}")
    links = re.findall(r"\((archive/[^)]+\.json)\)", cells["runs"])
    assert sorted(json.dumps(json.loads((tmp_path / link).read_text())["metrics"], sort_keys=True)
                  for link in links) == \
        sorted(json.dumps(r["metrics"], sort_keys=True) for r in runs)
    assert r"\toprule" in (tmp_path / "t.tex").read_text()
    assert (tmp_path / "plots" / "mini_ppl_vs_params.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "mini_acc_vs_speed.png").stat().st_size > 1000

    again = _report(str(sweep), "--name", "mini", "--results", str(results))
    assert again.returncode == 0 and results.read_text().count("analysis:mini begin") == 1


def test_a_rerun_resumes_every_stage(sweep, tiny_gguf):
    before = json.loads((sweep / "1" / "results.json").read_text())
    proc = _pipeline(*_args(tiny_gguf), "quant=ptq_q8_0", "prune.ratio=0.25", "seed=1",
                     f"hydra.run.dir={sweep / '1'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("baseline", "final", "export", "benchmark"):
        assert f"[{stage}] reusing" in proc.stdout, stage
    assert "reusing block scores" in proc.stdout
    after = json.loads((sweep / "1" / "results.json").read_text())
    assert after["resumed_from"] == 4 and after["metrics"] == before["metrics"]


def test_heal_then_prune_is_rebuilt_in_that_order(tiny_gguf, tmp_path):
    """Also the healing objective through the pipeline: kd+sft from the loaded model, recorded
    in the recipe and the facets, both terms in the history."""
    from alpaca_jax import forward
    from alpaca_jax.export.runtime import llama_logits
    from alpaca_jax.recipe.replay import load_run_model
    from alpaca_jax.peft.lora import merge
    from test_forward_parity import assert_close_logits

    proc = _pipeline(*_args(tiny_gguf), "stages=[heal,prune,export]", "prune.ratio=0.25",
                     "export.qtypes=[F32]", "export.prompts=[]", "distill=kd_sft",
                     "distill.tau=2.0", "distill.weight=0.7", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["facets"]["objective"] == "kd+sft"
    assert res["recipe"]["objective"] == {"objective": "kd+sft", "tau": 2.0, "weight": 0.7,
                                          "chunk": 0, "teacher": "stage:load",
                                          "teacher_layers": 4, "teacher_dtype": "float32"}
    for h in res["history"]:       # the step reports both terms; the loss is their mix
        assert h["loss"] == pytest.approx(0.7 * h["kd"] + 0.3 * h["nll"], rel=1e-5)
    assert res["history"][-1]["kd"] > 0      # the adapters moved away from the teacher
    params, cfg, _, recipe = load_run_model(tmp_path)
    assert recipe["order"] == ["heal", "prune", "export"] and cfg.num_layers == 3
    ids = list(range(3, 19))
    assert_close_logits(llama_logits(tmp_path / "model-f32.gguf", ids),
                        np.asarray(forward(merge(params), np.array([ids]), cfg)[0][0]))


@pytest.mark.parametrize("args, message", [
    (["stages=[export,load]"], "'export' cannot run before load"),
    (["stages=[benchmark,export]"], "list export before benchmark"),
    (["stages=[baseline,evaluat]"], "unknown stage 'evaluat'"),
    (["stages=[quantize,heal]", "quant=ptq_q8_0"], "heal comes after quantize"),
    (["stages=[quantize,evaluate]", "quant=qat_q8_0"], "there is no heal stage"),
    (["stages=[quantize,export]", "quant.method=ptq", "quant.format=int8_channel"],
     "GGUF holds q8_0, q4_0, q4_1"),
    (["skip=[load]"], "load cannot be skipped"),
    (["-m", "prune.ratioo=0.1,0.2"], "Key 'ratioo' not in 'PruneCfg'"),  # a sweep's missing key
    (["eval.include_path=[/nonexistent]"], "include_path /nonexistent: no such folder"),
    (["train.steps=2", "train.warmup_steps=4"], "train.warmup_steps=4 must lie in [0, steps=2]"),
    (["train.loss_chunk=-1"], "train.loss_chunk must be >= 0"),
    (["distill=kd", "distill.teacher=/nonexistent/t.gguf"],
     "distill.teacher='/nonexistent/t.gguf' cannot be loaded"),
])
def test_bad_stage_orders_and_sweeps_fail_before_any_work(tiny_gguf, tmp_path, args, message):
    flags = [a for a in args if a == "-m"]            # Hydra wants -m before the overrides
    code, _, err = run_app_here("pipeline", *flags, *_args(tiny_gguf),
                                *[a for a in args if a != "-m"], f"hydra.run.dir={tmp_path}",
                                f"hydra.sweep.dir={tmp_path}")
    assert code != 0 and message in err, err[-2000:]
    assert not (tmp_path / "results.json").exists() and not list(tmp_path.rglob("*.gguf"))


def test_a_bad_setting_fails_the_command_line_process(tiny_gguf, tmp_path):
    """The cases above run Hydra's main in the test process; one of them as a real process."""
    proc = _pipeline(*_args(tiny_gguf), "stages=[baseline,evaluat]", f"hydra.run.dir={tmp_path}",
                     timeout=180)
    assert proc.returncode == 1 and "unknown stage 'evaluat'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "results.json").exists()


def test_a_run_s_baseline_evaluation_can_be_a_row_of_its_own(tmp_path):
    """`analysis.report --baseline-rows`: a run that evaluated the unchanged model first (stage
    baseline) gives it a row with no prune, heal or quantization and the model's own size."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(json.dumps({
        "stage": "pipeline", "facets": {"criterion": "ppl", "pruned_blocks": 6, "heal": "none",
                                        "quant": "none", "objective": "none", "seed": 0},
        "metrics": {"baseline/ppl_wiki": 19.6, "final/ppl_wiki": 49.6, "params": 113.3e6,
                    "params_base": 134.5e6}}))
    assert [r["ppl_wiki"] for r in collect([tmp_path])] == [49.6]
    base, pruned = collect([tmp_path], baseline_rows=True)
    assert (base["criterion"], base["pruned_blocks"], base["ppl_wiki"], base["params"]) == \
        ("none", 0, 19.6, 134.5e6)
    assert (pruned["criterion"], pruned["ppl_wiki"], pruned["params"]) == ("ppl", 49.6, 113.3e6)
    # a second run of the sweep with the same baseline: one baseline row, not two (n=2, +- 0)
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "results.json").write_text(json.dumps(
        {**res, "metrics": {**res["metrics"], "final/ppl_wiki": 41.2}}))
    rows = collect([tmp_path], baseline_rows=True)
    assert [r["ppl_wiki"] for r in rows] == [19.6, 49.6, 41.2]
    # a finished run's model (run_dir=) is not the base model: no baseline row for it
    (tmp_path / "s" / "results.json").write_text(json.dumps({**res, "config": {"run_dir": "x"}}))
    assert [r["ppl_wiki"] for r in collect([tmp_path / "s"], baseline_rows=True)] == [49.6]


def test_malformed_results_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text('{"stage": "pipeline", "metrics": ')
    with pytest.raises(ResultsError, match="a/results.json: not valid JSON"):
        collect([tmp_path])
    (tmp_path / "a" / "results.json").write_text('{"stage": "pipeline"}')
    with pytest.raises(ResultsError, match="a/results.json: no 'metrics'"):
        collect([tmp_path])
    proc = _report(str(tmp_path), "--name", "x", "--results", str(tmp_path / "R.md"))
    assert proc.returncode != 0 and "a/results.json: no 'metrics'" in proc.stderr
    assert not (tmp_path / "R.md").exists()


def test_mean_and_std_over_seeds():
    rows = [{"path": f"r{s}", "criterion": "ppl", "ppl_wiki": v, "seed": s}
            for s, v in enumerate([10.0, 12.0, 14.0])]
    rows.append({"path": "b", "criterion": "bi", "ppl_wiki": 20.0, "seed": 0})
    summary = summarize(rows, ["criterion"], ["ppl_wiki", "copa/acc"])
    assert summary[0]["stats"]["ppl_wiki"] == (12.0, 2.0, 3) and summary[0]["n"] == 3
    assert summary[1]["stats"]["ppl_wiki"] == (20.0, None, 1)
    md = markdown(summary, ["criterion"], ["ppl_wiki", "copa/acc"])
    assert "| ppl | 3 | 12.00 ± 2.00 |" in md and "| bi | 1 | 20.00 |" in md
    assert "COPA" not in md                       # a metric no run has is left out
    assert r"12.00 $\pm$ 2.00" in latex(summary, ["criterion"], ["ppl_wiki"])


def test_task_accuracies_carry_their_stderr():
    """One run: acc ± lm-eval's stderr; seeds: mean ± std over seeds (mean stderr)."""
    rows = [{"path": "a", "criterion": "ppl", "copa/acc": 0.6, "copa/acc_stderr": 0.05},
            {"path": "b", "criterion": "ppl", "copa/acc": 0.7, "copa/acc_stderr": 0.03},
            {"path": "c", "criterion": "bi", "copa/acc": 0.5, "copa/acc_stderr": 0.04}]
    md = markdown(summarize(rows, ["criterion"], ["copa/acc"]), ["criterion"], ["copa/acc"])
    assert "| ppl | 2 | 65.0 ± 7.1 (4.0) |" in md and "| bi | 1 | 50.0 ± 4.0 |" in md
    assert "standard error" in md


def test_sections_are_replaced_in_place():
    text = "# R\n\n<!-- analysis:a begin -->\nold\n<!-- analysis:a end -->\n\ntail\n"
    new = replace_section(text, "a", "new table")
    assert new == "# R\n\n<!-- analysis:a begin -->\nnew table\n<!-- analysis:a end -->\n\ntail\n"
    assert replace_section("# R\n", "b", "x").endswith(
        "<!-- analysis:b begin -->\nx\n<!-- analysis:b end -->\n")
    with pytest.raises(ValueError, match="without a matching"):
        replace_section("<!-- analysis:a begin -->\n", "a", "x")


def test_the_slurm_launcher_config_composes():
    code, out, err = run_app_here("pipeline", "hydra/launcher=slurm", "--cfg", "hydra")
    assert code == 0, err[-2000:]
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out


def test_the_multinode_slurm_launcher_asks_for_one_task_per_node_with_all_its_gpus(tmp_path):
    """The generated sbatch script (submitit's own, from the composed launcher settings, as
    hydra-submitit passes them) for 2 nodes: 2 tasks, one per node, each with its node's GPUs."""
    import yaml
    from submitit.slurm.slurm import _make_sbatch_string

    code, out, err = run_app_here("pipeline", "hydra/launcher=slurm_multinode",
                                  "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                                  "--cfg", "hydra")
    assert code == 0, err[-2000:]
    launcher = yaml.safe_load(out)["hydra"]["launcher"]
    assert launcher["nodes"] == 2 and launcher["tasks_per_node"] == 1
    # what SlurmExecutor renders (it refuses to start where there is no srun)
    script = _make_sbatch_string(
        "python -m app", tmp_path, nodes=launcher["nodes"],
        ntasks_per_node=launcher["tasks_per_node"], gpus_per_node=launcher["gpus_per_node"],
        cpus_per_task=launcher["cpus_per_task"], mem=f"{launcher['mem_gb']}GB",
        time=launcher["timeout_min"])
    assert "#SBATCH --nodes=2" in script
    assert "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gpus-per-node=4" in script
    assert "srun" in script          # every task runs the job: 2 processes, one cluster


def test_settings_added_later_stay_out_of_stage_records_at_their_default():
    """A stage is redone when its recorded settings differ; a setting added since a run
    recorded its stages (train.loss_chunk, export.float_reference) is left out of the record
    while at its default, so that run resumes its stages instead of redoing them."""
    from alpaca_jax.recipe.settings import Job
    from alpaca_jax.recipe.stages import _asdict, _heal_settings

    job = Job()
    assert "loss_chunk" not in _heal_settings(job)["train"]
    assert "float_reference" not in _asdict(job.export)
    job.train.loss_chunk, job.export.float_reference = 64, "smollm2-135m-instruct"
    assert _heal_settings(job)["train"]["loss_chunk"] == 64
    assert _asdict(job.export)["float_reference"] == "smollm2-135m-instruct"
