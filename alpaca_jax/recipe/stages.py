"""The stages of a recipe, registered by name: each is a function of (state, tag) that reads the
job's settings and changes the state (the model, its transform, the metrics), wrapped by the
run's `StageStore` through `settings` (what its output depends on). A finished run's model is
rebuilt by replaying its recorded stages through the same registry (`replay`).

  baseline   evaluate the model as loaded (group `eval`)
  prune      score blocks and remove them (group `prune`; ratio 0 or criterion none: none)
  heal       train (group `peft`: adapters, `none` = full fine-tuning; `train`, `data`;
             `distill`: the objective)
  quantize   round the weights to `quant.format` (PTQ), or, with `quant.method=qat`, the grid
             heal trains through
  evaluate   evaluate the model as it now is (may be listed more than once)
  export     GGUF files (the quantized format, else `export.qtypes`), checked against JAX
  benchmark  the exported files in llama.cpp: tokens/s, peak RSS, bandwidth bound; JAX fp32
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alpaca_jax.recipe.settings import Job


@dataclass
class State:
    """What the stages pass along: the model as it now is and everything the results record."""
    job: Job
    run_dir: Path
    stages: list
    params: dict
    cfg: object
    tok: object
    transform: object = None          # what the forward applies to the weights (quantizer, ...)
    quant: dict | None = None         # the quant settings + `tensors`, once quantized
    prune: dict | None = None         # the block_scores.json record of the removed blocks
    finetune: str = "none"            # none | full | lora | dora
    adapter_dir: str | None = None
    train_result: object = None
    teacher: object = None
    teachers: dict = field(default_factory=dict)   # name -> (params, cfg) kept for distillation
    metrics: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    exports: dict = field(default_factory=dict)
    harness: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)       # the instruction data and its statistics
    prep: object = None                            # eval.suite.Prepared
    store: object = None
    log: Callable = print                          # W&B logging of metrics
    eval_fns: dict = field(default_factory=dict)
    base: str = ""                                 # the lineage: the model first loaded
    order: list = field(default_factory=list)      # and every stage that changed it, in order
    mesh: object = None                            # the device mesh every stage runs on


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[State, str], None]
    settings: Callable[[Job], dict]                # the fingerprint of its output
    replay: Callable[[State, dict, Path], None] | None = None   # from a finished run's recipe


STAGES: dict[str, Stage] = {}


def stage(name: str, settings: Callable[[Job], dict], replay=None):
    def register(fn):
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        STAGES[name] = Stage(name, fn, settings, replay)
        return fn
    return register


def eval_tags(stages: list[str]) -> list[str]:
    """The name each stage's output is stored and reported under: `baseline`; `final` for the
    last `evaluate`; an earlier `evaluate` is `after_<the stage before it>`."""
    last = max((i for i, s in enumerate(stages) if s == "evaluate"), default=None)
    tags = []
    for i, s in enumerate(stages):
        if s != "evaluate":
            tags.append(s)
        elif i == last:
            tags.append("final")
        else:
            prev = next((p for p in reversed(stages[:i]) if p not in ("evaluate", "baseline")),
                        "load")
            tags.append(f"after_{prev}")
    return tags


# Settings added after runs had recorded their stages: left out of a stage's settings record
# while at their default, so a run from before them resumes its stages instead of redoing them.
_ADDED_LATER = {"TrainConfig": {"loss_chunk": 0}, "ExportCfg": {"float_reference": None}}


def _asdict(x):
    d = dataclasses.asdict(x)
    for name, default in _ADDED_LATER.get(type(x).__name__, {}).items():
        if d.get(name) == default:
            del d[name]
    return d


# -- evaluation ------------------------------------------------------------------------------

def _evaluate(st: State, tag: str) -> None:
    from alpaca_jax.eval.suite import evaluate_suite
    from alpaca_jax.quant.qat import fixed
    from alpaca_jax.train.step import make_eval_fn

    saved = st.store.load(tag)
    if saved is None:
        params, transform = fixed(st.params, st.transform)   # a K-quant model rounded once
        key = (transform, st.cfg)
        if key not in st.eval_fns:
            st.eval_fns[key] = make_eval_fn(st.cfg, transform)
        m, s = evaluate_suite(params, st.cfg, st.tok, st.job.eval, st.prep,
                              materialize=transform, eval_fn=st.eval_fns[key],
                              batch_size=st.job.train.eval_batch_size)
        del params
        saved = {"metrics": m, "samples": s, "harness": st.prep.harness}
        st.store.save(tag, saved)
    st.harness.update(saved.get("harness") or {})   # lm-eval version, task versions, n-shot
    st.metrics.update({f"{tag}/{k}": v for k, v in saved["metrics"].items()})
    st.samples[tag] = saved["samples"]
    st.log({f"{tag}/{k}": v for k, v in saved["metrics"].items() if isinstance(v, (int, float))})
    print(f"[{tag}] " + ", ".join(f"{k}={v:.4g}" for k, v in saved["metrics"].items()
                                  if isinstance(v, float)), flush=True)


stage("baseline", lambda job: _asdict(job.eval))(_evaluate)
stage("evaluate", lambda job: _asdict(job.eval))(_evaluate)


# -- prune -----------------------------------------------------------------------------------

def _replay_prune(st: State, recipe: dict, run_dir: Path) -> None:
    from alpaca_jax.prune import drop_layers

    pruned = (recipe.get("prune") or {}).get("pruned") or []
    if pruned:
        st.params, st.cfg = drop_layers(st.params, st.cfg, pruned)
    st.prune = recipe.get("prune")


@stage("prune", lambda job: _asdict(job.prune), replay=_replay_prune)
def _prune(st: State, tag: str) -> None:
    from alpaca_jax import count_params
    from alpaca_jax.prune import drop_layers, n_blocks_for
    from alpaca_jax.recipe.pruning import prune_model

    p, cfg = st.job.prune, st.cfg
    n = p.n_blocks if p.n_blocks is not None else (
        n_blocks_for(p.ratio, cfg.num_layers) if p.ratio is not None else 0)
    if p.criterion == "none" or n == 0:
        st.prune = {"criterion": p.criterion, "pruned": [], "num_layers": cfg.num_layers}
    else:
        st.prune = prune_model(p, st.job.model.source, st.params, cfg, st.tok, st.run_dir,
                               upstream=st.store.chain)
        st.params, st.cfg = drop_layers(st.params, cfg, st.prune["pruned"])
    if "stage:prune" in st.teachers:
        st.teachers["stage:prune"] = (st.params, st.cfg)   # the pruned model, before healing
    print(f"[prune] removed {st.prune['pruned']}; {st.cfg.num_layers} blocks, "
          f"{count_params(st.params) / 1e6:.1f}M parameters", flush=True)


# -- heal ------------------------------------------------------------------------------------

def _heal_settings(job: Job) -> dict:
    out = {"peft": _asdict(job.peft), "train": _asdict(job.train)}
    if job.distill.objective != "sft":
        out["distill"] = _asdict(job.distill)
    if job.quant.method == "qat":
        out["quant"] = _asdict(job.quant)   # QAT trains through the quantizer
    return out


def _replay_heal(st: State, recipe: dict, run_dir: Path) -> None:
    from alpaca_jax.io.run_model import adapter_dir, restore_full
    from alpaca_jax.peft import load_peft

    st.finetune = recipe["finetune"]
    if st.finetune not in ("none", "full"):     # a registered PEFT method
        st.params = load_peft(st.params, st.cfg, adapter_dir(run_dir, recipe))
    elif st.finetune == "full":
        st.params = restore_full(st.params, run_dir)


@stage("heal", _heal_settings, replay=_replay_heal)
def _heal(st: State, tag: str) -> None:
    import jax
    from tqdm import tqdm

    from alpaca_jax import count_params
    from alpaca_jax.peft import add_lora, is_adapter, save_peft
    from alpaca_jax.train.distill import make_teacher
    from alpaca_jax.train.loop import train
    from alpaca_jax.train.split import split, train_all

    job = st.job
    pc, tc, dc = job.peft, job.train, job.distill
    st.teacher = make_teacher(dc, *st.teachers[dc.teacher], st.cfg) \
        if dc.objective != "sft" else None
    trainable = train_all
    if pc.method != "none":
        st.params = add_lora(st.params, st.cfg, jax.random.PRNGKey(pc.init_seed), rank=pc.rank,
                             alpha=pc.alpha, targets=pc.targets, dropout=pc.dropout,
                             method=pc.method, scaling=pc.scaling)
        trainable = is_adapter
    st.metrics["trainable_params"] = count_params(split(st.params, trainable)[0])
    bar = tqdm(total=tc.steps, desc="heal", unit="step")

    def log(entry):
        st.log(entry, step=entry["step"])
        bar.n = entry["step"]
        bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k in ("loss", "val_loss")})
        bar.refresh()

    materialize = st.transform
    if job.quant.method == "qat" and "quantize" in st.stages:   # wherever quantize is listed
        from alpaca_jax.recipe.quantizing import quantizer

        materialize = quantizer(job.quant, st.cfg)
    res = train(st.params, st.cfg, st.data["train_rows"], st.data["val_rows"], tc, st.run_dir,
                log=log, trainable=trainable, materialize=materialize, mesh=st.mesh,
                rules=job.mesh.rules,
                fingerprint={"upstream": st.store.chain}, teacher=st.teacher)
    bar.close()
    st.train_result = res
    st.params = res.best_params if res.best_params is not None else res.params
    st.finetune = "full" if pc.method == "none" else pc.method
    if pc.method != "none":   # every process gathers (a collective), process 0 writes
        from alpaca_jax.parallel.cluster import is_writer, to_host

        host = to_host(st.params) if jax.process_count() > 1 else st.params
        st.adapter_dir = str(st.run_dir / "adapter")
        if is_writer():
            save_peft(host, st.cfg, st.run_dir / "adapter",
                      base_model_name_or_path=job.model.source)
    heal = {"best_val_loss": res.best_val_loss, "best_step": res.best_step,
            "final_train_loss": res.history[-1]["loss"] if res.history else None,
            "train_tokens_per_s": res.tokens_per_s}
    saved = st.store.load("heal")
    if saved is not None and res.resumed_from == tc.steps:
        heal["train_tokens_per_s"] = saved["train_tokens_per_s"]   # nothing trained now
    elif res.resumed_from is None:
        st.store.save("heal", heal)   # a resumed run's throughput is of its last part only
    st.metrics.update({f"heal/{k}": v for k, v in heal.items()})


# -- quantize --------------------------------------------------------------------------------

def _replay_quantize(st: State, recipe: dict, run_dir: Path) -> None:
    from alpaca_jax.recipe.quantizing import quantizer_of_record

    if recipe.get("quant"):
        st.transform = quantizer_of_record(recipe["quant"], st.cfg)
        st.quant = recipe["quant"]


@stage("quantize", lambda job: _asdict(job.quant), replay=_replay_quantize)
def _quantize(st: State, tag: str) -> None:
    from alpaca_jax.recipe.quantizing import quantizer

    qc = st.job.quant
    if qc.method == "none":
        print("[quantize] quant=none: the model stays float", flush=True)
        return
    st.transform = quantizer(qc, st.cfg)   # PTQ: round-to-nearest; QAT: the grid heal trains on
    st.quant = {**_asdict(qc), "tensors": dict(st.transform.formats)}
    print(f"[quantize] {qc.method} {qc.format}: {len(st.quant['tensors'])} tensors", flush=True)


# -- export and benchmark --------------------------------------------------------------------

def lineage(st: State) -> dict:
    """The model's lineage as results.json records it (and `replay` reads)."""
    from alpaca_jax.peft import adapter_summary

    return {"base": st.base, "order": list(st.order),
            "finetune": st.finetune, "prune": st.prune, "adapter_dir": st.adapter_dir,
            "adapter": (adapter_summary(st.params) or None) if st.finetune != "none" else None,
            "quant": st.quant}


def float_reference(st: State):
    """`(params, cfg)` of `export.float_reference`, checked to share the model's vocabulary.
    On the host (numpy), like the params `process0_alone` hands the export: placed by the mesh
    the export runs under, which in a multi-process job is process 0's own."""
    import jax
    import numpy as np

    from alpaca_jax.train.distill import check_teacher, load_teacher

    ref = st.job.export.float_reference
    if not ref or not st.job.export.parity_tokens:
        return None
    params, cfg, tok = load_teacher(ref, setting="export.float_reference")
    check_teacher(ref, cfg, tok, st.cfg, st.tok, setting="export.float_reference")
    return jax.tree.map(np.asarray, params), cfg


@stage("export", lambda job: _asdict(job.export))
def _export(st: State, tag: str) -> None:
    from alpaca_jax.export.report import export_files
    from alpaca_jax.parallel.cluster import process0_alone
    from alpaca_jax.peft.lora import merge

    e = st.job.export
    quantized_here = st.quant is not None and "quantize" in st.stages
    qtypes = [st.quant["format"].upper()] if quantized_here else [str(q).upper()
                                                                   for q in e.qtypes]

    def work(params):     # host work: process 0 alone in a multi-process job
        saved = st.store.load("export")
        if saved is None or not all((st.run_dir / x["file"]).is_file() for x in saved.values()):
            saved = export_files(params, st.cfg, st.tok, qtypes, st.run_dir, e, lineage(st),
                                 f"alpaca_jax {st.job.name}", float_reference(st))
            st.store.save("export", saved)
        return saved
    saved = process0_alone("export", work, merge(st.params))
    if saved is None:     # not process 0: it wrote the files and records them
        return
    st.exports = saved
    for q, x in saved.items():
        st.metrics[f"export/{q}/file_mb"] = x["file_bytes"] / 2**20
        if "parity" in x:
            st.metrics[f"export/{q}/kl_mean"] = x["parity"]["kl_mean"]
            st.metrics[f"export/{q}/argmax_agreement"] = x["parity"]["argmax_agreement"]
            st.metrics[f"export/{q}/ppl_wiki"] = x["parity"]["ppl_llama_cpp"]
            if "kl_float" in x["parity"]:     # absent in exports stored before it existed
                st.metrics[f"export/{q}/kl_float"] = x["parity"]["kl_float"]
        if "greedy" in x:
            st.metrics[f"export/{q}/greedy_identical"] = sum(a["identical"] for a in x["greedy"])


@stage("benchmark", lambda job: _asdict(job.export))
def _benchmark(st: State, tag: str) -> None:
    from alpaca_jax.export.report import bench_files, jax_generation_tok_s, wiki_ids
    from alpaca_jax.parallel.cluster import process0_alone
    from alpaca_jax.peft.lora import merge

    e = st.job.export

    def work(params):     # timings of process 0's own devices in a multi-process job
        saved = st.store.load("benchmark")
        if saved is None:
            bm = bench_files(st.exports, st.run_dir, e, st.tok) if e.bench else {}
            if e.jax_bench:
                bm["jax_fp32/gen_tok_s"] = jax_generation_tok_s(
                    params, st.cfg, wiki_ids(st.tok, e.prompt_tokens), e.gen_tokens, e.repeats)
            saved = {"metrics": bm, "exports": st.exports}
            st.store.save("benchmark", saved)
        return saved
    saved = process0_alone("benchmark", work, merge(st.params))
    if saved is None:
        return
    st.exports = saved["exports"]
    st.metrics.update({f"bench/{k}": v for k, v in saved["metrics"].items()})
