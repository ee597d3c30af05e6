"""One run of a recipe: check every setting, read the data, load the model (or replay a
finished run's), run the listed stages through the registry, write `results.json` (one shape
for every preset: RESULTS_SCHEMA.md)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from alpaca_jax.recipe.settings import Job


def facets(job: Job, stages: list[str], prune_record) -> dict:
    """What distinguishes this run in an ablation table."""
    p = job.prune
    removed = len(prune_record["pruned"]) if prune_record else 0
    criterion = prune_record.get("criterion", p.criterion) if prune_record else p.criterion
    return {"experiment": job.name,
            "criterion": criterion if removed else "none",
            "pruned_blocks": removed,
            "prune_ratio": p.ratio if p.ratio is not None and removed else 0.0,
            "heal": ("none" if "heal" not in stages else
                     "full" if job.peft.method == "none" else job.peft.method),
            "quant": ("none" if job.quant.method == "none" or "quantize" not in stages else
                      f"{job.quant.method}_{job.quant.format}"),
            "objective": job.distill.objective if "heal" in stages else "none",
            "seed": job.train.seed}


def load(job: Job, mesh=None):
    """(params, cfg, tokenizer, the replayed run's State or None); on `mesh`, each tensor
    placed by the logical rules as it is read."""
    from alpaca_jax import load_model
    from alpaca_jax.parallel.logical import leaf_sharding, param_shardings, place_tree
    from alpaca_jax.prune import drop_layers

    if job.run_dir is not None:
        from alpaca_jax.recipe.replay import replay

        st, _ = replay(job.run_dir,
                       None if mesh is None else leaf_sharding(mesh, job.mesh.rules))
        if mesh is not None:     # the adapters it added too
            st.params = place_tree(st.params, param_shardings(st.params, mesh,
                                                              job.mesh.rules)[0])
        return st.params, st.cfg, st.tok, st
    params, cfg, tok = load_model(job.model.source, job.model.param_dtype,
                                  None if mesh is None else leaf_sharding(mesh, job.mesh.rules))
    if job.drop_blocks:      # bad indices: drop_layers names them, before any work
        params, cfg = drop_layers(params, cfg, list(job.drop_blocks))
    return params, cfg, tok, None


def run(job: Job, run_dir: Path, resolved: dict) -> dict:
    """Join the cluster if the job is a multi-process one, build the mesh, and run every
    stage on it (`parallel/`)."""
    import jax

    from alpaca_jax.parallel import make_mesh
    from alpaca_jax.parallel.cluster import initialize, is_writer

    initialize(job.distributed)
    mesh = make_mesh(job.mesh)
    if is_writer():
        print(f"[mesh] {dict(mesh.shape)} over {jax.device_count()} devices, "
              f"{jax.process_count()} process(es)", flush=True)
    try:
        with jax.set_mesh(mesh):
            return _run(job, run_dir, resolved, mesh)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        raise PeerLostError(
            f"process {jax.process_index()} of {jax.process_count()}: a cross-process "
            f"operation failed, most likely because another process of this job died "
            f"({str(e)[:300]}). Completed work is kept in {run_dir} (stages/, checkpoints/): "
            "start every process again to resume.") from e


class PeerLostError(RuntimeError):
    """A multi-process job lost a peer (a collective or barrier failed)."""


def _run(job: Job, run_dir: Path, resolved: dict, mesh) -> dict:
    from alpaca_jax import count_params
    from alpaca_jax.data.alpaca import split_records
    from alpaca_jax.eval.suite import prepare
    from alpaca_jax.model.adapters import adapted
    from alpaca_jax.parallel.cluster import is_writer
    from alpaca_jax.parallel.logical import leaf_sharding
    from alpaca_jax.peft.lora import merge
    from alpaca_jax.provenance import git_sha, machine, versions, write_json_atomic
    from alpaca_jax.recipe.checks import check_settings
    from alpaca_jax.recipe.data import load_instruction_records, pack_instruction_data
    from alpaca_jax.recipe.quantizing import quantizer
    from alpaca_jax.recipe.stages import STAGES, State, float_reference, eval_tags, lineage
    from alpaca_jax.recipe.store import StageStore
    from alpaca_jax.tracking import finish_run, start_run
    from alpaca_jax.train.distill import check_teacher, load_teacher, teacher_stage

    t0, sha = time.time(), git_sha()
    run_dir = Path(run_dir)
    stages = check_settings(job)
    d, dc = job.data, job.distill
    needs_data = "heal" in stages or job.eval.instruction_samples > 0 and any(
        s in stages for s in ("baseline", "evaluate"))
    train_rec, val_rec = [], []
    if needs_data:                    # bad data fails before the model loads
        train_rec, val_rec = split_records(load_instruction_records(d), d.val_size, d.split_seed)
    params, cfg, tok, replayed = load(job, mesh)
    cfg = cfg.replace(compute_dtype=job.model.compute_dtype, remat=job.model.remat,
                      attention=job.model.attention)
    st = State(job=job, run_dir=run_dir, stages=stages, params=params, cfg=cfg, tok=tok,
               transform=adapted, mesh=mesh)
    st.base, st.order = job.model.source, list(stages)
    if replayed is not None:          # a finished run's model: its lineage carries on
        for key in ("transform", "prune", "quant", "finetune", "adapter_dir", "base", "order"):
            setattr(st, key, getattr(replayed, key))
    elif job.drop_blocks:
        st.prune = {"criterion": "given", "pruned": sorted(job.drop_blocks),
                    "num_layers": cfg.num_layers + len(job.drop_blocks)}
    if job.quant.method != "none" and "quantize" in stages:
        quantizer(job.quant, cfg)     # a tensor the format cannot take fails here
    distilling = "heal" in stages and dc.objective != "sft"
    if distilling and teacher_stage(dc.teacher) is None:   # a model loaded now, checked now
        t_params, t_cfg, t_tok = load_teacher(
            dc.teacher, None if mesh is None else leaf_sharding(mesh, job.mesh.rules))
        check_teacher(dc.teacher, t_cfg, t_tok, cfg, tok)
        st.teachers[dc.teacher] = (t_params, t_cfg)
    elif distilling:                  # a stage's model, kept when that stage ends
        st.teachers[dc.teacher] = (params, cfg)
    if "export" in stages:            # a bad float reference fails now, not after training
        float_reference(st)          # (loaded again by the export stage, not held meanwhile)
    if needs_data:
        train_rows, val_rows, st.data["stats"] = pack_instruction_data(d, tok, train_rec,
                                                                        val_rec)
        st.data.update(train_rows=train_rows, val_rows=val_rows)
    st.prep = prepare(job.eval, tok, cfg.vocab_size, val_rows=st.data.get("val_rows"),
                      val_records=val_rec, synthetic=d.source == "synthetic")
    source = job.run_dir or job.model.source
    n_base = count_params(params)
    print(f"[load] {source}: {n_base / 1e6:.1f}M parameters, {cfg.num_layers} blocks; "
          f"stages: {' -> '.join(stages)}", flush=True)

    wb = start_run(job.logger, run_dir, job.name, {**resolved, "git_sha": sha,
                                                   "versions": versions()})
    st.log = wb.log
    st.store = StageStore(run_dir)
    st.store.advance("load", {"model": dataclasses.asdict(job.model),
                              "data": dataclasses.asdict(d), "run_dir": job.run_dir,
                              "drop_blocks": list(job.drop_blocks)})
    st.metrics["params_base"] = n_base
    timings = {}
    for name, tag in zip(stages, eval_tags(stages)):
        ts = time.time()
        st.store.advance(tag, STAGES[name].settings(job))
        STAGES[name].run(st, tag)
        timings[tag] = round(time.time() - ts, 1)
    st.metrics["params"] = count_params(merge(st.params))
    res = st.train_result
    results = {
        "stage": "pipeline", "name": job.name, "facets": facets(job, stages, st.prune),
        "stages": stages, "stage_time_s": timings, "metrics": st.metrics, "samples": st.samples,
        "exports": st.exports, "data": st.data.get("stats"), "harness": st.harness or None,
        "history": res.history if res else [], "val_history": res.val_history if res else [],
        "resumed_from": res.resumed_from if res else None,
        "checkpoint_fallbacks": res.checkpoint_fallbacks if res else [],
        "recipe": {**lineage(st),
                   "replayed_from": None if replayed is None else job.run_dir,
                   "train": dataclasses.asdict(job.train) if "heal" in stages else None,
                   "objective": (None if "heal" not in stages else
                                 st.teacher.record if st.teacher is not None
                                 else {"objective": "sft"})},
        "config": resolved, "git_sha": sha, "versions": versions(), "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "wall_time_s": round(time.time() - t0, 1),
    }
    write_json_atomic(run_dir / "results.json", results)
    finish_run(wb, {k: v for k, v in st.metrics.items() if isinstance(v, (int, float))})
    if is_writer():
        print(f"wrote {run_dir / 'results.json'} ({results['wall_time_s']:.0f} s)", flush=True)
    return results
