"""The ablation pipeline: one run of a compression recipe, stage by stage.

    python experiments/pipeline.py                                  # the default experiment
    python experiments/pipeline.py experiment=taylor_plus_20pct_lora
    python experiments/pipeline.py -m experiment=ppl_20pct_lora seed=0,1,2
    python experiments/pipeline.py stages=[baseline,prune,evaluate] prune=bi_20pct

Stages (`stages=`, in the order listed; a stage left out is skipped; `load` is implicit):
  baseline   evaluate the loaded model (group `eval`)
  prune      score blocks and remove them (group `prune`; ratio 0 or criterion none: none)
  heal       train (group `peft`: LoRA/DoRA adapters, `none` = full fine-tuning; `train`, `data`;
             `distill`: the objective, sft or distillation from a teacher, by default the model
             before pruning)
  quantize   round the weights to `quant.format`: listed before heal it is QAT (heal trains
             through the quantizer, `quant=qat_*`), after heal or without it PTQ (`quant=ptq_*`)
  evaluate   evaluate the model as it now is
  export     GGUF files (the quantized format, else `export.qtypes`), checked against JAX
  benchmark  the exported files in llama.cpp: tokens/s, peak RSS, bandwidth bound; JAX fp32

Every stage's output is kept in the run dir (`stages/<stage>.json`, `block_scores.json`, the
training checkpoints, the GGUFs): a re-run in the same dir reuses what its settings (and all
upstream settings) still match and resumes training. `results.json` is written at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from experiments.app import hydra_app  # noqa: E402
from experiments.schema import STAGES, PipelineJob  # noqa: E402


def check_stages(job: PipelineJob) -> list[str]:
    """The stages to run (`stages` minus `skip`, `load` removed), checked against each other
    and against the recipe."""
    from alpaca_jax.quant import exportable_formats   # the GGML formats in the registry

    for key in ("stages", "skip"):
        for s in getattr(job, key):
            if s not in STAGES:
                raise ValueError(f"{key}: unknown stage {s!r}; stages are {', '.join(STAGES)}")
    stages = list(job.stages)
    if len(set(stages)) != len(stages):
        raise ValueError(f"stages={stages} lists a stage twice")
    if "load" in stages and stages[0] != "load":
        raise ValueError(f"stages={stages}: {stages[0]!r} cannot run before load (every stage "
                         f"needs the model); put load first or leave it out (it is implicit)")
    if "load" in job.skip:
        raise ValueError("skip: load cannot be skipped; every stage needs the model")
    stages = [s for s in stages if s != "load" and s not in job.skip]
    pos = {s: i for i, s in enumerate(stages)}
    if "benchmark" in pos and pos.get("export", len(stages)) > pos["benchmark"]:
        raise ValueError(f"stages={stages}: benchmark times the exported files; list export "
                         f"before benchmark")
    q = job.quant
    if q.method == "qat" and "quantize" in pos:
        if "heal" not in pos:
            raise ValueError("quant.method=qat trains through the quantizer, but there is no "
                             "heal stage (without training, use a ptq_* preset)")
        if job.peft.method != "none" and job.peft.dropout > 0:
            raise ValueError(f"QAT over {job.peft.method} quantizes W + s*A@B as one weight, "
                             f"which has no per-input dropout: set peft.dropout=0")
    if q.method == "ptq" and "heal" in pos and pos.get("quantize", -1) > -1 and \
            pos["quantize"] < pos["heal"]:
        raise ValueError("quant.method=ptq rounds the weights as they are, but heal comes "
                         "after quantize; list quantize after heal, or use a qat_* preset")
    if q.method != "none" and "quantize" in pos and "export" in pos and \
            pos["quantize"] < pos["export"] and \
            q.format not in exportable_formats():
        raise ValueError(f"export of a {q.format} model: GGUF holds "
                         f"{', '.join(exportable_formats())}; "
                         f"quantize to one of them or export before quantize")
    unused = [g for g, st, on in (("prune", "prune", job.prune.criterion != "none"),
                                   ("peft/train", "heal", True),
                                   ("distill", "heal", job.distill.objective != "sft"),
                                   ("quant", "quantize", q.method != "none"),
                                   ("export", "export", True)) if on and st not in pos]
    if unused:     # said, not silent: a group whose stage is not run does nothing
        print(f"[stages] not run: {', '.join(s for s in STAGES[1:] if s not in pos)}; "
              f"settings unused: {', '.join(unused)}", flush=True)
    if "heal" in pos and job.train.steps < 1:
        raise ValueError("stage heal needs train.steps >= 1")
    if "heal" in pos and job.distill.objective != "sft" and \
            job.distill.teacher == "stage:prune" and pos.get("prune", len(stages)) > pos["heal"]:
        raise ValueError(f"distill.teacher=stage:prune: stages={stages} has no prune stage "
                         f"before heal")
    return stages


def check_settings(job: PipelineJob) -> list[str]:
    """Everything that can be checked without the model, so it fails before any work; returns
    the stages to run."""
    from experiments.export import check_export_cfg
    from experiments.finetune import check_peft, check_prune
    from alpaca_jax.quant import parse_format
    from alpaca_jax.train.distill import check_distill
    from alpaca_jax.train.optim import make_schedule

    check_distill(job.distill)
    stages = check_stages(job)
    if "heal" in stages:   # the schedule's own checks (warmup within steps, ...), before any work
        t = job.train
        make_schedule(t.lr, t.steps, t.warmup_steps, t.schedule, t.min_lr_ratio)
    check_peft(job.peft)
    check_prune(job.prune)
    q = job.quant
    if q.method not in ("none", "ptq", "qat"):
        raise ValueError(f"quant.method={q.method!r} is not one of none, ptq, qat")
    if q.method != "none":
        for key in ("format", "embed", "head"):
            if key == "format" or getattr(q, key) not in ("auto", "none"):
                parse_format(getattr(q, key))
    check_export_cfg(job.export)
    if job.eval.tasks and ("baseline" in stages or "evaluate" in stages):
        from alpaca_jax.eval.lm_tasks import resolve_tasks

        resolve_tasks(job.eval.tasks, job.eval.include_path)   # names, task files, data
    return stages


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageStore:
    """`stages/<name>.json` per stage, keyed by a fingerprint that chains every upstream
    stage's settings: a re-run reuses a stage only if nothing it depends on changed."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chain = ""

    def advance(self, name: str, settings) -> str:
        self.chain = _fingerprint(self.chain, name, settings)
        return self.chain

    def load(self, name: str):
        path = self.dir / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == self.chain:
                print(f"[{name}] reusing {path}", flush=True)
                return saved["output"]
        return None

    def save(self, name: str, output) -> None:
        from alpaca_jax.provenance import write_json_atomic

        write_json_atomic(self.dir / f"{name}.json", {"fingerprint": self.chain,
                                                      "output": output})


def facets(job: PipelineJob, stages: list[str], prune_record) -> dict:
    """What distinguishes this run in an ablation table."""
    p = job.prune
    removed = len(prune_record["pruned"]) if prune_record else 0
    return {"experiment": job.name,
            "criterion": p.criterion if removed else "none",
            "pruned_blocks": removed,
            "prune_ratio": p.ratio if p.ratio is not None and removed else 0.0,
            "heal": ("none" if "heal" not in stages else
                     "full" if job.peft.method == "none" else job.peft.method),
            "quant": ("none" if job.quant.method == "none" or "quantize" not in stages else
                      f"{job.quant.method}_{job.quant.format}"),
            "objective": job.distill.objective if "heal" in stages else "none",
            "seed": job.seed}


def run(job: PipelineJob, run_dir: Path, resolved: dict) -> dict:
    import jax
    from tqdm import tqdm

    from experiments.export import bench_files, export_files, jax_generation_tok_s, wiki_ids
    from experiments.finetune import load_instruction_records, pack_instruction_data, prune_model
    from experiments.suite import evaluate_suite, prepare
    from alpaca_jax import count_params, load_model
    from alpaca_jax.data.alpaca import split_records
    from alpaca_jax.model.adapters import adapted
    from alpaca_jax.peft import add_lora, adapter_summary, is_adapter, save_peft
    from alpaca_jax.peft.lora import merge
    from alpaca_jax.provenance import git_sha, machine, versions, write_json_atomic
    from alpaca_jax.prune import drop_layers, n_blocks_for
    from alpaca_jax.quant import FakeQuant, QuantSpec
    from alpaca_jax.tracking import finish_run, start_run
    from alpaca_jax.train.distill import check_teacher, load_teacher, make_teacher, teacher_stage
    from alpaca_jax.train.loop import train
    from alpaca_jax.train.split import split, train_all
    from alpaca_jax.train.step import make_eval_fn

    t0, sha = time.time(), git_sha()
    stages = check_settings(job)
    tc = dataclasses.replace(job.train, seed=job.seed)
    pc = dataclasses.replace(job.peft, init_seed=job.seed)
    d, ev, e, qc = job.data, job.eval, job.export, job.quant
    records = load_instruction_records(d)             # bad data fails before the model loads
    train_rec, val_rec = split_records(records, d.val_size, d.split_seed)
    params, cfg, tok = load_model(job.model.source, job.model.param_dtype)
    cfg = cfg.replace(compute_dtype=job.model.compute_dtype, remat=job.model.remat,
                      attention=job.model.attention)
    if qc.method != "none":   # a tensor the format cannot take fails here, before any compute
        FakeQuant.from_spec(QuantSpec(qc.format, qc.embed, qc.head, qc.activations), cfg)
    dc = job.distill
    distilling = "heal" in stages and dc.objective != "sft"
    # the teacher: a stage's model (kept when that stage ends) or a model loaded now, so a
    # teacher that cannot serve this student fails before any compute
    teachers = {}
    if distilling and teacher_stage(dc.teacher) is None:
        t_params, t_cfg, t_tok = load_teacher(dc.teacher)
        check_teacher(dc.teacher, t_cfg, t_tok, cfg, tok)
        teachers[dc.teacher] = (t_params, t_cfg)
    elif distilling and teacher_stage(dc.teacher) == "load":
        teachers[dc.teacher] = (params, cfg)
    train_rows, val_rows, data_stats = pack_instruction_data(d, tok, train_rec, val_rec)
    prep = prepare(ev, tok, cfg.vocab_size, val_rows=val_rows, val_records=val_rec,
                   synthetic=d.source == "synthetic")
    print(f"[load] {job.model.source}: {count_params(params) / 1e6:.1f}M parameters, "
          f"{cfg.num_layers} blocks; stages: {' -> '.join(stages)}", flush=True)

    wb = start_run(job.logger, run_dir, "pipeline", {**resolved, "git_sha": sha,
                                                     "versions": versions()})
    store = StageStore(run_dir)
    store.advance("load", {"model": dataclasses.asdict(job.model), "data": dataclasses.asdict(d)})
    n_base = count_params(params)
    metrics = {"params_base": n_base}
    samples, timings, exports = {}, {}, {}
    transform, quant_formats, prune_record, adapter_dir = adapted, None, None, None
    finetune, train_res, teacher = "none", None, None
    eval_fns, harness = {}, {}
    qat = qc.method == "qat" and "quantize" in stages

    def quantizer(c):
        return FakeQuant.from_spec(QuantSpec(qc.format, qc.embed, qc.head, qc.activations), c)

    def suite(tag):
        key = (transform, cfg)
        if key not in eval_fns:
            eval_fns[key] = make_eval_fn(cfg, transform)
        saved = store.load(tag)
        if saved is None:
            m, s = evaluate_suite(params, cfg, tok, ev, prep, materialize=transform,
                                  eval_fn=eval_fns[key], batch_size=tc.eval_batch_size)
            saved = {"metrics": m, "samples": s, "harness": prep.harness}
            store.save(tag, saved)
        harness.update(saved.get("harness") or {})   # lm-eval version, task versions, n-shot
        metrics.update({f"{tag}/{k}": v for k, v in saved["metrics"].items()})
        samples[tag] = saved["samples"]
        wb.log({f"{tag}/{k}": v for k, v in saved["metrics"].items()
                if isinstance(v, (int, float))})
        print(f"[{tag}] " + ", ".join(f"{k}={v:.4g}" for k, v in saved["metrics"].items()
                                      if isinstance(v, float)), flush=True)

    for stage in stages:
        ts = time.time()
        if stage in ("baseline", "evaluate"):
            store.advance(stage, dataclasses.asdict(ev))
            suite("baseline" if stage == "baseline" else "final")
        elif stage == "prune":
            upstream = store.advance("prune", dataclasses.asdict(job.prune))
            n = job.prune.n_blocks if job.prune.n_blocks is not None else (
                n_blocks_for(job.prune.ratio, cfg.num_layers) if job.prune.ratio is not None
                else 0)
            if job.prune.criterion == "none" or n == 0:
                prune_record = {"criterion": job.prune.criterion, "pruned": [],
                                "num_layers": cfg.num_layers}
            else:
                prune_record = prune_model(job.prune, job.model.source, params, cfg, tok,
                                           run_dir, upstream=upstream)
                params, cfg = drop_layers(params, cfg, prune_record["pruned"])
            if distilling and dc.teacher == "stage:prune":
                teachers[dc.teacher] = (params, cfg)     # the pruned model, before healing
            print(f"[prune] removed {prune_record['pruned']}; {cfg.num_layers} blocks, "
                  f"{count_params(params) / 1e6:.1f}M parameters", flush=True)
        elif stage == "heal":
            upstream = store.advance("heal", {"peft": dataclasses.asdict(pc),
                                              "train": dataclasses.asdict(tc),
                                              **({"distill": dataclasses.asdict(dc)}
                                                 if distilling else {})})
            teacher = make_teacher(dc, *teachers[dc.teacher], cfg) if distilling else None
            trainable = train_all
            if pc.method != "none":
                params = add_lora(params, cfg, jax.random.PRNGKey(pc.init_seed),
                                  rank=pc.rank, alpha=pc.alpha, targets=pc.targets,
                                  dropout=pc.dropout, method=pc.method, scaling=pc.scaling)
                trainable = is_adapter
            metrics["trainable_params"] = count_params(split(params, trainable)[0])
            bar = tqdm(total=tc.steps, desc="heal", unit="step")

            def log(entry):
                wb.log(entry, step=entry["step"])
                bar.n = entry["step"]
                bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items()
                                 if k in ("loss", "val_loss")})
                bar.refresh()

            # QAT trains through the quantizer wherever the quantize stage is listed
            train_res = train(params, cfg, train_rows, val_rows, tc, run_dir, log=log,
                              trainable=trainable,
                              materialize=quantizer(cfg) if qat else transform,
                              fingerprint={"upstream": upstream}, teacher=teacher)
            bar.close()
            params = (train_res.best_params if train_res.best_params is not None
                      else train_res.params)
            finetune = "full" if pc.method == "none" else pc.method
            if pc.method != "none":
                adapter_dir = str(save_peft(params, cfg, run_dir / "adapter",
                                            base_model_name_or_path=job.model.source))
            heal = {"best_val_loss": train_res.best_val_loss, "best_step": train_res.best_step,
                    "train_tokens_per_s": train_res.tokens_per_s}
            saved = store.load("heal")
            if saved is not None and train_res.resumed_from == tc.steps:
                heal["train_tokens_per_s"] = saved["train_tokens_per_s"]  # nothing trained now
            elif train_res.resumed_from is None:
                store.save("heal", heal)   # a resumed run's throughput is of its last part only
            metrics.update({f"heal/{k}": v for k, v in heal.items()})
        elif stage == "quantize":
            store.advance("quantize", dataclasses.asdict(qc))
            if qc.method == "none":
                print("[quantize] quant=none: the model stays float", flush=True)
            else:        # PTQ: round-to-nearest from here on; QAT: the grid heal trained on
                transform = quantizer(cfg)
                quant_formats = dict(transform.formats)
                print(f"[quantize] {qc.method} {qc.format}: {len(quant_formats)} tensors",
                      flush=True)
        elif stage == "export":
            store.advance("export", dataclasses.asdict(e))
            qtypes = ([qc.format.upper()] if quant_formats is not None
                      else [str(q).upper() for q in e.qtypes])
            saved = store.load("export")
            if saved is None or not all((run_dir / x["file"]).is_file() for x in saved.values()):
                recipe_now = {"quant": None if quant_formats is None else {
                    **dataclasses.asdict(qc), "tensors": quant_formats}}
                saved, _ = export_files(merge(params), cfg, tok, qtypes, run_dir, e, recipe_now,
                                        f"alpaca_jax {job.name}")
                store.save("export", saved)
            exports = saved
        elif stage == "benchmark":
            store.advance("benchmark", dataclasses.asdict(e))
            saved = store.load("benchmark")
            if saved is None:
                bm = bench_files(exports, run_dir, e, tok)
                if e.jax_bench:
                    bm["jax_fp32/gen_tok_s"] = jax_generation_tok_s(
                        merge(params), cfg, wiki_ids(tok, e.prompt_tokens), e.gen_tokens,
                        e.repeats)
                saved = {"metrics": bm, "exports": exports}
                store.save("benchmark", saved)
            exports = saved["exports"]
            metrics.update({f"bench/{k}": v for k, v in saved["metrics"].items()})
        timings[stage] = round(time.time() - ts, 1)
    for q, x in exports.items():
        metrics[f"export/{q}/file_mb"] = x["file_bytes"] / 2**20
        if "parity" in x:
            metrics[f"export/{q}/kl_mean"] = x["parity"]["kl_mean"]
    metrics["params"] = count_params(merge(params))

    results = {
        "stage": "pipeline", "name": job.name, "facets": facets(job, stages, prune_record),
        "stages": stages, "stage_time_s": timings, "metrics": metrics, "samples": samples,
        "exports": exports, "data": data_stats, "harness": harness or None,
        "history": train_res.history if train_res else [],
        "val_history": train_res.val_history if train_res else [],
        "resumed_from": train_res.resumed_from if train_res else None,
        "recipe": {"base": job.model.source, "order": stages, "finetune": finetune,
                   "prune": prune_record, "adapter_dir": adapter_dir,
                   "adapter": (adapter_summary(params) or None) if finetune != "none" else None,
                   "quant": None if quant_formats is None else {
                       **dataclasses.asdict(qc), "tensors": quant_formats},
                   "train": dataclasses.asdict(tc) if "heal" in stages else None,
                   "objective": (None if "heal" not in stages else
                                 teacher.record if teacher is not None else {"objective": "sft"})},
        "config": resolved, "git_sha": sha, "versions": versions(), "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "wall_time_s": round(time.time() - t0, 1),
    }
    write_json_atomic(run_dir / "results.json", results)
    finish_run(wb, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    print(f"wrote {run_dir / 'results.json'} ({results['wall_time_s']:.0f} s)", flush=True)
    return results


main = hydra_app("pipeline", PipelineJob, run)

if __name__ == "__main__":
    main()
