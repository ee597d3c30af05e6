"""Every setting that can be checked without the model, checked before any work: a bad key,
value or stage order fails in the first second of a run, naming itself, not after the baseline
evaluation or the pruning pass."""
from __future__ import annotations

from pathlib import Path

from alpaca_jax.paths import resolve_path
from alpaca_jax.recipe.settings import Job

EVAL_STAGES = ("baseline", "evaluate")


def check_peft(p) -> None:
    from alpaca_jax.peft import PEFT_METHODS, check_settings, resolve_targets

    if p.method != "none" and p.method not in PEFT_METHODS:
        raise ValueError(f"peft.method={p.method!r} is not one of none (full fine-tuning), "
                         f"{', '.join(PEFT_METHODS)}")
    if p.method != "none":
        check_settings(p.rank, p.alpha, p.dropout, p.method, p.scaling)
        resolve_targets(p.targets)


def check_prune(p) -> None:
    from alpaca_jax.prune.registry import get_criterion, iterative_criteria
    from alpaca_jax.prune.scores import canonical_criterion

    if p.criterion == "none":
        return
    criterion = canonical_criterion(p.criterion)
    if (p.n_blocks is None) == (p.ratio is None):
        raise ValueError(f"prune: set exactly one of prune.n_blocks and prune.ratio (got "
                         f"n_blocks={p.n_blocks}, ratio={p.ratio})")
    if p.ratio is not None and not 0.0 <= p.ratio < 1.0:
        raise ValueError(f"prune.ratio must be in [0, 1), got {p.ratio}")
    if p.n_blocks is not None and p.n_blocks < 0:
        raise ValueError(f"prune.n_blocks must be >= 0, got {p.n_blocks}")
    for key in ("keep_first", "keep_last"):
        if getattr(p, key) is not None and getattr(p, key) < 0:
            raise ValueError(f"prune.{key} must be >= 0, got {getattr(p, key)}")
    if p.iterative and not get_criterion(criterion).supports_iterative:
        raise ValueError(f"prune.iterative re-scores with the "
                         f"{' or '.join(iterative_criteria())} criterion; got {criterion!r}")
    if p.calib_samples < 1 or p.calib_len < 2:
        raise ValueError(f"prune: calibration needs calib_samples >= 1 and calib_len >= 2 "
                         f"(got {p.calib_samples}, {p.calib_len})")
    if p.calib.endswith(".npy") and not Path(resolve_path(p.calib)).is_file():
        raise FileNotFoundError(f"prune.calib={p.calib}: no such file")


def check_quant(q) -> None:
    from alpaca_jax.quant import parse_format
    from alpaca_jax.quant.file_types import check_quant_name

    if q.method not in ("none", "ptq", "qat"):
        raise ValueError(f"quant.method={q.method!r} is not one of none, ptq, qat")
    if q.method != "none":
        check_quant_name(q.format)
        for key in ("embed", "head"):
            if getattr(q, key) not in ("auto", "none"):
                parse_format(getattr(q, key))


def check_export(e) -> None:
    from alpaca_jax.export import QTYPES

    if not e.qtypes:
        raise ValueError("export.qtypes is empty; give at least one of " + ", ".join(QTYPES))
    for q in e.qtypes:
        if str(q).upper() not in QTYPES:
            raise ValueError(f"export.qtypes: {q!r} is not one of {', '.join(QTYPES)}")
    if any(t < 1 for t in e.threads) or (e.bench and not e.threads):
        raise ValueError(f"export.threads must be a non-empty list of counts >= 1, got {e.threads}")
    for key in ("prompt_tokens", "gen_tokens", "repeats", "max_new_tokens"):
        if getattr(e, key) < 1:
            raise ValueError(f"export.{key} must be >= 1, got {getattr(e, key)}")
    if e.parity_tokens < 0:
        raise ValueError(f"export.parity_tokens must be >= 0, got {e.parity_tokens}")


def check_stages(job: Job) -> list[str]:
    """The stages to run (`stages` minus `skip`), checked against each other and the recipe.

    How quantization meets training: `quant.method` decides, not the position of `quantize`.
    `qat`: heal trains through the quantizer wherever quantize is listed (an `evaluate` between
    quantize and heal sees the round-to-nearest model QAT starts from). `ptq`: quantize rounds
    the weights as they are, so it must come after heal."""
    from alpaca_jax.recipe.stages import STAGES

    for key in ("stages", "skip"):
        for s in getattr(job, key):
            if s not in STAGES and s != "load":
                raise ValueError(f"{key}: unknown stage {s!r}; stages are {', '.join(STAGES)} "
                                 f"(load is implicit and first)")
    if "load" in job.stages and job.stages[0] != "load":
        raise ValueError(f"stages={list(job.stages)}: {job.stages[0]!r} cannot run before load "
                         f"(every stage needs the model); put load first or leave it out")
    if "load" in job.skip:
        raise ValueError("skip: load cannot be skipped; every stage needs the model")
    stages = [s for s in job.stages if s not in job.skip and s != "load"]
    if not stages:
        raise ValueError(f"stages={list(job.stages)} skip={list(job.skip)}: nothing to run")
    once = [s for s in stages if s != "evaluate"]
    if len(set(once)) != len(once):
        raise ValueError(f"stages={list(job.stages)} lists a stage twice (only evaluate may be)")
    pos = {s: i for i, s in enumerate(stages)}
    if "benchmark" in pos and pos.get("export", len(stages)) > pos["benchmark"]:
        raise ValueError(f"stages={stages}: benchmark times the exported files; list export "
                         f"before benchmark")
    if "baseline" in pos and any(pos[s] < pos["baseline"] for s in ("prune", "heal", "quantize")
                                 if s in pos):
        raise ValueError(f"stages={stages}: baseline evaluates the model as loaded; list it "
                         f"before prune, heal and quantize (evaluate evaluates it later)")
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
            pos["quantize"] < pos["export"]:
        from alpaca_jax.quant.file_types import exportable_names

        if q.format not in exportable_names():
            raise ValueError(f"export of a {q.format} model: GGUF holds "
                             f"{', '.join(exportable_names())}; quantize to one of them or "
                             f"export before quantize")
    unused = [g for g, st, on in (("prune", "prune", job.prune.criterion != "none"),
                                   ("peft/train", "heal", True),
                                   ("distill", "heal", job.distill.objective != "sft"),
                                   ("quant", "quantize", q.method != "none"),
                                   ("export", "export", True)) if on and st not in pos]
    if unused:     # said, not silent: a group whose stage is not run does nothing
        print(f"[stages] not run: {', '.join(s for s in STAGES if s not in pos)}; "
              f"settings unused: {', '.join(unused)}", flush=True)
    if "heal" in pos and job.train.steps < 1:
        raise ValueError("stage heal needs train.steps >= 1")
    if job.train.loss_chunk < 0:
        raise ValueError(f"train.loss_chunk must be >= 0 (0: the whole sequence at once), got "
                         f"{job.train.loss_chunk}")
    if "heal" in pos and job.train.loss_chunk and job.distill.objective != "sft":
        print(f"[stages] train.loss_chunk={job.train.loss_chunk} chunks the next-token loss of "
              f"validation only; distill={job.distill.objective} trains with distill.chunk="
              f"{job.distill.chunk}", flush=True)
    if job.export.float_reference and not job.export.parity_tokens and "export" in pos:
        raise ValueError("export.float_reference is the model of the KL-vs-float parity figure, "
                         "but export.parity_tokens=0 computes no parity; set parity_tokens or "
                         "drop float_reference")
    if "heal" in pos and job.distill.objective != "sft" and \
            job.distill.teacher == "stage:prune" and pos.get("prune", len(stages)) > pos["heal"]:
        raise ValueError(f"distill.teacher=stage:prune: stages={stages} has no prune stage "
                         f"before heal")
    return stages


def check_settings(job: Job) -> list[str]:
    """Everything that can be checked without the model; returns the stages to run."""
    from alpaca_jax.train.distill import check_distill
    from alpaca_jax.train.optim import make_schedule

    check_distill(job.distill)
    stages = check_stages(job)
    d = job.data
    if "heal" in stages:
        if d.cutoff_len > d.seq_len:
            raise ValueError(f"data.cutoff_len={d.cutoff_len} > data.seq_len={d.seq_len}")
        t = job.train     # the schedule's own checks (warmup within steps, ...)
        make_schedule(t.lr, t.steps, t.warmup_steps, t.schedule, t.min_lr_ratio)
    check_peft(job.peft)
    check_prune(job.prune)
    check_quant(job.quant)
    check_export(job.export)
    if job.run_dir is not None:
        from alpaca_jax.io.run_model import run_recipe

        if job.drop_blocks:
            raise ValueError("drop_blocks applies to model.source; a run's recipe already lists "
                             "the blocks it removed")
        changing = [s for s in stages if s in ("prune", "heal", "quantize")]
        if changing:
            raise ValueError(f"run_dir={job.run_dir}: a finished run's model is evaluated or "
                             f"exported as it is; stages {changing} would change it (drop them, "
                             f"or run the whole recipe from model.source)")
        run_recipe(job.run_dir)      # a missing or malformed results.json fails here
    ev = job.eval
    if ev.task_limit is not None and ev.task_limit < 1:
        raise ValueError(f"eval.task_limit must be >= 1 or null, got {ev.task_limit}")
    if ev.tasks and any(s in stages for s in EVAL_STAGES):
        from alpaca_jax.eval.lm_tasks import resolve_tasks

        resolve_tasks(ev.tasks, ev.include_path)   # names, task files, data
    return stages
