"""The one experiment app (alpaca_jax.recipe under the Hydra presets in conf/): it gives the
metrics the five separate apps gave for the same overrides (recorded before they were merged,
tests/fixtures/old_apps_metrics.json), and the ways the old apps disagreed are gone."""
import dataclasses
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from gguf_reference import tiny_bpe_vocab, write_tiny_gguf
from hf_reference import tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
OLD = json.loads((ROOT / "tests" / "fixtures" / "old_apps_metrics.json").read_text())


def _job(config: str, overrides: list[str]):
    """The Job an app builds from these command-line overrides (aliases' renames included)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from experiments.app import register_schema, to_job, translate
    from experiments.finetune import RENAMES, stages

    register_schema()
    if config in ("finetune", "prune"):
        overrides = translate(overrides, RENAMES)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=overrides)
    job = to_job(cfg)
    return (stages(job) if config in ("finetune", "prune") else job), cfg


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny4.gguf"
    write_tiny_gguf(tiny_hf_model(vocab=len(tiny_bpe_vocab()[0]), max_pos=512, layers=4), path)
    return path


def _renamed(app: str, key: str, stages: list[str]) -> str:
    """An old app's metric name in the one results shape."""
    healed = "heal" in stages
    prefix, _, rest = key.partition("/")
    if not rest:
        return {"best_val_loss": "heal/best_val_loss", "best_step": "heal/best_step",
                "final_train_loss": "heal/final_train_loss"}.get(key, key)
    if app == "pipeline":
        return key
    new = {"base": "baseline", "after": "final",
           "before": ("baseline" if app == "finetune" else
                      "after_prune" if healed else "final"),
           "ptq": "after_quantize" if healed else "final"}[prefix]
    return f"{new}/{rest}"


# the one override spelled differently now: the prune presets that differed by one word are gone
RESPELLED = {"prune=bi_20pct": "prune.criterion=bi"}


# finetune_full and prune_ppl_lora are left out for the suite's 15-minute budget: full
# fine-tuning runs end to end in test_finetune_experiment.py (SIGKILL and resume) and
# test_export_experiment.py (QAT), PPL pruning then LoRA in pipeline_ppl_lora_ptq here and in
# test_prune_experiment.py. (Their recorded metrics stay in the fixture.)
@pytest.mark.parametrize("name", ["finetune_ptq", "finetune_qat_lora", "pipeline_ppl_lora_ptq",
                                  "prune_bi_noheal"])
def test_the_one_app_gives_the_old_apps_metrics(name, tiny_gguf, tmp_path):
    from omegaconf import OmegaConf

    from alpaca_jax.recipe import run

    old = OLD["runs"][name]
    args = [RESPELLED.get(a, a) for a in old["args"]]
    job, cfg = _job(old["app"], [f"model.source={tiny_gguf}", *args])
    res = run(job, tmp_path, OmegaConf.to_container(cfg, resolve=True))
    m = res["metrics"]
    compared = 0
    for key, value in old["metrics"].items():
        new = _renamed(old["app"], key, res["stages"])
        if key == "trainable_params" and "heal" not in res["stages"]:
            continue     # the old apps counted every weight as trainable when nothing trained
        assert new in m, (key, new, sorted(m))
        assert m[new] == pytest.approx(value, rel=1e-5, abs=1e-9), (key, new)
        compared += 1
    assert compared >= 6
    assert ((res["recipe"]["prune"] or {}).get("pruned") or None) == old["pruned"]
    if name == "finetune_ptq":   # untied: embed q4_0 as llama.cpp, head q8_0
        t = res["recipe"]["quant"]["tensors"]
        assert (t["layers/wq"], t["embed"], t["lm_head"]) == ("q4_0", "q4_0", "q8_0")


def test_prune_heal_false_is_skipping_the_heal_stage():
    job, _ = _job("prune", ["prune.heal=false"])
    assert job.skip == ["heal"] and "heal" not in job.stages
    with pytest.raises(ConfigCompositionException):
        _job("pipeline", ["prune.heal=false"])       # one way to say it: skip=[heal]
    with pytest.raises(ValueError, match="skip="):
        _job("prune", ["prune.heal=maybe"])


def test_every_app_reads_one_eval_schema():
    ft, _ = _job("finetune", ["eval.corpus=tiny", "eval.ppl_tokens=100", "eval.samples=1"])
    assert (ft.eval.corpora, ft.eval.max_tokens, ft.eval.instruction_samples) == (["tiny"], 100, 1)
    jobs = [_job(c, [])[0] for c in ("pipeline", "finetune", "prune", "evaluate", "export")]
    assert len({type(j.eval) for j in jobs}) == 1
    assert [j.stages for j in jobs[3:]] == [["evaluate"], ["export", "benchmark"]]


def test_seed_is_a_default_not_an_overwrite():
    job, _ = _job("pipeline", ["seed=3"])
    assert (job.train.seed, job.peft.init_seed) == (3, 3)
    job, _ = _job("pipeline", ["seed=3", "train.seed=5"])
    assert (job.train.seed, job.peft.init_seed) == (5, 3)


def test_stage_checks():
    from alpaca_jax.recipe.checks import check_settings
    from alpaca_jax.recipe.settings import Job, PeftCfg, QuantCfg
    from alpaca_jax.recipe.stages import eval_tags

    qat = QuantCfg(method="qat", format="q4_0")
    for order in (["quantize", "heal", "evaluate"], ["heal", "quantize", "evaluate"]):
        assert check_settings(Job(stages=order, quant=qat)) == order   # method decides
    with pytest.raises(ValueError, match="set peft.dropout=0"):
        check_settings(Job(stages=["quantize", "heal"], quant=qat,
                           peft=PeftCfg(method="lora", dropout=0.1)))
    with pytest.raises(ValueError, match="unknown stage 'heall'; stages are baseline"):
        check_settings(Job(stages=["heall"]))
    with pytest.raises(ValueError, match="only evaluate may be"):
        check_settings(Job(stages=["prune", "prune"]))
    with pytest.raises(ValueError, match="baseline evaluates the model as loaded"):
        check_settings(Job(stages=["prune", "baseline"]))
    assert eval_tags(["baseline", "prune", "evaluate", "quantize", "evaluate", "heal",
                      "evaluate"]) == ["baseline", "prune", "after_prune", "quantize",
                                       "after_quantize", "heal", "final"]


def test_a_finished_runs_model_is_not_changed_by_a_replay(tmp_path):
    from alpaca_jax.recipe.checks import check_settings
    from alpaca_jax.recipe.settings import Job

    (tmp_path / "results.json").write_text(json.dumps(
        {"stage": "pipeline", "metrics": {}, "recipe": {"base": "x", "finetune": "none"}}))
    with pytest.raises(ValueError, match=r"stages \['prune'\] would change it"):
        check_settings(Job(stages=["prune", "evaluate"], run_dir=str(tmp_path)))
    job = dataclasses.replace(Job(stages=["evaluate"]), run_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no such file"):
        check_settings(job)


def test_the_archived_runs_still_tabulate():
    """Every results.json under results/ (written by the apps before and after the merge)
    is read into rows with facets and final metrics."""
    from analysis.collect import collect

    # results/gpu/ archives benchmark printouts (benchmarks/bench_gpu.py), not runs
    files = sorted(f for f in (ROOT / "results").rglob("*.json") if "gpu" not in f.parts)
    rows = collect(files)
    assert len(rows) == len(files) >= 10
    for r in rows:
        assert r["criterion"] and r["heal"] and "params" in r, r["path"]
        # an export-and-benchmark run (the edge tables) evaluates its files, not the model;
        # a training run archived beside such benchmarks (the QAT rows' heals, stages without
        # evaluate) is evaluated there, through its exported files
        record = json.loads(Path(r["path"]).read_text())
        exported = record.get("exports")
        evaluated_beside = "evaluate" not in record.get("stages", ["evaluate"]) and any(
            json.loads(f.read_text()).get("exports") for f in Path(r["path"]).parent.glob("*.json"))
        assert "ppl_wiki" in r or exported or evaluated_beside, r["path"]
