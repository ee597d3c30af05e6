"""Fine-tune on Alpaca-schema data and evaluate before/after.

    python experiments/finetune.py                                   # SmolLM2, alpaca_small
    python experiments/finetune.py data=synthetic train=quick logger=disabled
    python experiments/finetune.py -m train.lr=1e-5,3e-5             # a sweep (basic launcher)
    python experiments/finetune.py peft=lora_r8                      # LoRA (Shortened LLaMA recipe)
    python experiments/finetune.py peft=dora_r8 peft.rank=16         # DoRA

With adapters, only they train (and are checkpointed); the best adapter is also written in HF
PEFT's format to `<run dir>/adapter` (loads with `peft.PeftModel.from_pretrained` onto the base
model exported by `alpaca_jax.save_hf`).

Re-running with the same `hydra.run.dir` resumes from its last checkpoint. Writes
`results.json` (schema: RESULTS_SCHEMA.md) and W&B logs (offline by default) in the run dir.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from alpaca_jax.paths import resolve_path  # noqa: E402
from experiments.app import hydra_app  # noqa: E402
from experiments.schema import FinetuneJob  # noqa: E402



def load_instruction_records(data):
    from alpaca_jax.data.alpaca import load_records
    from alpaca_jax.data.synthetic import generate_tasks

    if data.source == "synthetic":
        records = generate_tasks(data.synthetic_size, seed=data.split_seed)
    else:
        records = load_records(resolve_path(data.source))
    return records[: data.max_records] if data.max_records else records


def pack_instruction_data(d, tok, train_rec, val_rec):
    """(train rows, val rows or None, stats): records encoded with the loss on the response
    only, truncated at `d.cutoff_len` (counted), packed into rows of `d.seq_len`."""
    from alpaca_jax.data.alpaca import encode_records
    from alpaca_jax.data.batching import pack

    enc_train = encode_records(tok, train_rec, d.cutoff_len)
    enc_val = encode_records(tok, val_rec, d.cutoff_len)
    if len(enc_train) == 0:
        raise ValueError(f"data.cutoff_len={d.cutoff_len}: no training example keeps a response "
                         f"token (all {len(enc_train.dropped)} prompts fill the cutoff)")
    pad = tok.pad_id if tok.pad_id is not None else 0
    train_rows = pack(enc_train.ids, enc_train.loss_mask, d.seq_len, pad, d.packing)
    val_rows = pack(enc_val.ids, enc_val.loss_mask, d.seq_len, pad, d.packing) if val_rec else None
    stats = {"records": len(train_rec) + len(val_rec), "train_examples": len(enc_train),
             "val_examples": len(enc_val), "train_rows": len(train_rows),
             "truncated": enc_train.n_truncated + enc_val.n_truncated,
             "dropped_no_response": len(enc_train.dropped) + len(enc_val.dropped),
             "train_loss_tokens": int(train_rows.loss_mask.sum())}
    print(f"data: {stats}", flush=True)
    return train_rows, val_rows, stats


def check_peft(p) -> None:
    """Bad adapter settings fail here, before data or model are loaded."""
    from alpaca_jax.peft import check_settings, resolve_targets

    if p.method not in ("none", "lora", "dora"):
        raise ValueError(f"peft.method={p.method!r} is not one of none, lora, dora")
    if p.method != "none":
        check_settings(p.rank, p.alpha, p.dropout, p.method, p.scaling)
        resolve_targets(p.targets)


def check_prune(p) -> None:
    """Bad pruning settings fail here, before data or model are loaded."""
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


def prune_model(p, source: str, params, cfg, tok, run_dir: Path, upstream: str | None = None
                ) -> dict:
    """Score, choose and record the blocks to remove (`block_scores.json`). A re-run in the same
    run dir with the same settings (and `upstream`, a fingerprint of what changed the model
    before pruning) reuses the saved scores instead of recomputing them."""
    from alpaca_jax.prune import (calibration_ids, check_n_blocks, criterion_needs_calibration,
                                  n_blocks_for, protection, prune_plan)
    from alpaca_jax.prune.scores import canonical_criterion
    from alpaca_jax.provenance import write_json_atomic

    criterion = canonical_criterion(p.criterion)
    n = p.n_blocks if p.n_blocks is not None else n_blocks_for(p.ratio, cfg.num_layers)
    keep_first, keep_last = protection(criterion, p.keep_first, p.keep_last)
    check_n_blocks(n, cfg.num_layers, keep_first, keep_last)   # before any compute
    settings = {**{k: v for k, v in dataclasses.asdict(p).items() if k != "heal"},
                "criterion": criterion, "model": source, "num_layers": cfg.num_layers}
    if upstream is not None:
        settings["upstream"] = upstream
    path = run_dir / "block_scores.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            print(f"reusing block scores from {path}", flush=True)
            return saved
    needs_calib = criterion_needs_calibration(criterion)
    calib = calibration_ids(resolve_path(p.calib), tok, cfg.vocab_size, n=p.calib_samples,
                            seq_len=p.calib_len, seed=p.seed) if needs_calib else None
    t0 = time.time()
    plan = prune_plan(params, cfg, calib, criterion, n, keep_first=keep_first,
                      keep_last=keep_last, iterative=p.iterative, batch_size=p.batch_size,
                      seed=p.seed)
    plan.update(scoring_time_s=round(time.time() - t0, 2), settings=settings)
    write_json_atomic(path, plan)
    print(f"block scores ({criterion}): " + " ".join(
        f"{i}:{s:.4g}" for i, s in enumerate(plan["scores"]) if s is not None), flush=True)
    return plan


def check_quant(q, peft) -> None:
    from alpaca_jax.quant import parse_format

    if q.method not in ("none", "ptq", "qat"):
        raise ValueError(f"quant.method={q.method!r} is not one of none, ptq, qat")
    if q.method == "none":
        return
    for key in ("format", "embed", "head"):
        value = getattr(q, key)
        if key == "format" or value not in ("auto", "none"):
            parse_format(value)
    if q.method == "ptq" and peft.method != "none":
        raise ValueError("quant.method=ptq trains nothing; drop peft= (or use quant.method=qat)")
    if q.method == "qat" and peft.method != "none" and peft.dropout > 0:
        raise ValueError(f"QAT over {peft.method} quantizes W + s*A@B as one weight, which has no "
                         f"per-input dropout: set peft.dropout=0 (got {peft.dropout})")


def run(job: FinetuneJob, run_dir: Path, resolved: dict) -> dict:
    import jax

    from alpaca_jax import count_params, generate, load_model
    from alpaca_jax.model.adapters import adapted
    from alpaca_jax.peft import adapter_summary, add_lora, is_adapter, save_peft
    from alpaca_jax.prune import drop_layers
    from alpaca_jax.quant import FakeQuant, QuantSpec
    from alpaca_jax.train.split import split, train_all
    from alpaca_jax.data.alpaca import format_prompt, split_records
    from alpaca_jax.data.corpora import load_documents
    from alpaca_jax.data.synthetic import exact_match
    from alpaca_jax.eval.perplexity import perplexity
    from alpaca_jax.provenance import git_sha, machine, versions, write_json_atomic
    from alpaca_jax.tracking import finish_run, start_run
    from alpaca_jax.train.loop import evaluate_loss, train
    from alpaca_jax.train.sharding import make_mesh
    from alpaca_jax.train.step import make_eval_fn

    t0, sha = time.time(), git_sha()
    d, tc, ev = job.data, job.train, job.eval
    if d.cutoff_len > d.seq_len:
        raise ValueError(f"data.cutoff_len={d.cutoff_len} > data.seq_len={d.seq_len}")
    check_peft(job.peft)
    check_quant(job.quant, job.peft)
    check_prune(job.prune)
    records = load_instruction_records(d)              # bad data fails before the model loads
    train_rec, val_rec = split_records(records, d.val_size, d.split_seed)
    corpus = load_documents(resolve_path(ev.corpus))
    params, cfg, tok = load_model(job.model.source, job.model.param_dtype)
    cfg = cfg.replace(compute_dtype=job.model.compute_dtype, remat=job.model.remat,
                      attention=job.model.attention)
    n_base = count_params(params)
    qc = job.quant
    if qc.method != "none":   # a tensor the format cannot take fails here, before any compute
        FakeQuant.from_spec(QuantSpec(qc.format, qc.embed, qc.head, qc.activations), cfg)
    train_rows, val_rows, data_stats = pack_instruction_data(d, tok, train_rec, val_rec)
    mesh = make_mesh(fsdp=job.mesh_fsdp) if job.mesh_fsdp > 1 else None

    stage = "finetune" if job.prune.criterion == "none" else "prune"
    wb = start_run(job.logger, run_dir, stage,
                   {**resolved, "git_sha": sha, "versions": versions()})
    eval_fns = {}
    ppl_ids = tok.encode("\n\n".join(corpus), bos=False, parse_special=False)[: ev.ppl_tokens]
    prompts = [format_prompt(r) for r in val_rec[: ev.samples]]

    def evaluate(p, tag, materialize=adapted):
        m = {f"{tag}/ppl_{ev.corpus}": perplexity(p, cfg, ppl_ids, ctx_len=ev.ctx_len,
                                                   materialize=materialize)}
        if val_rows is not None:
            if (materialize, cfg) not in eval_fns:
                eval_fns[materialize, cfg] = make_eval_fn(cfg, materialize)
            fn = eval_fns[materialize, cfg]
            m[f"{tag}/val_loss"] = evaluate_loss(p, val_rows, fn, tc.eval_batch_size)
        outs = generate(p, cfg, tok, prompts, max_new_tokens=ev.max_new_tokens,
                        materialize=materialize) if prompts else []
        if d.source == "synthetic" and outs:
            m[f"{tag}/exact_match"] = exact_match(outs, val_rec[: ev.samples])
        print(f"{tag}: {m}", flush=True)
        return m, [{"prompt": r["instruction"] + (" | " + r["input"] if r["input"] else ""),
                    "reference": r["output"], "output": o} for r, o in zip(val_rec, outs)]

    prune_record, base_metrics = None, {}
    if job.prune.criterion != "none":
        base_metrics, _ = evaluate(params, "base")          # the unpruned model
        prune_record = prune_model(job.prune, job.model.source, params, cfg, tok, run_dir)
        params, cfg = drop_layers(params, cfg, prune_record["pruned"])
        print(f"removed blocks {prune_record['pruned']} ({prune_record['criterion']}); "
              f"{cfg.num_layers} of {prune_record['num_layers']} remain", flush=True)
    n_model = count_params(params)
    pc, trainable = job.peft, train_all
    if pc.method != "none":
        params = add_lora(params, cfg, jax.random.PRNGKey(pc.init_seed), rank=pc.rank,
                          alpha=pc.alpha, targets=pc.targets, dropout=pc.dropout,
                          method=pc.method, scaling=pc.scaling)
        trainable = is_adapter
    n_trainable = count_params(split(params, trainable)[0])
    transform, quant_formats = adapted, None
    if qc.method != "none":
        transform = FakeQuant.from_spec(QuantSpec(qc.format, qc.embed, qc.head, qc.activations),
                                        cfg)
        quant_formats = dict(transform.formats)

    before, samples_before = evaluate(params, "before")
    quantized_before, samples_ptq = {}, None
    if qc.method != "none":  # round-to-nearest: the starting point of QAT, the PTQ baseline
        quantized_before, samples_ptq = evaluate(params, "ptq", transform)

    def log(entry):
        wb.log(entry, step=entry["step"])
        if "val_loss" in entry or entry["step"] % 10 == 0 or entry["step"] == 1:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in entry.items()), flush=True)

    train_done = qc.method != "ptq" and job.prune.heal
    if train_done:
        res = train(params, cfg, train_rows, val_rows, tc, run_dir, mesh=mesh, log=log,
                    trainable=trainable, materialize=transform,
                    fingerprint={"peft": dataclasses.asdict(pc), "quant": dataclasses.asdict(qc),
                                 "prune": dataclasses.asdict(job.prune)})
        final = res.best_params if res.best_params is not None else res.params
    else:
        res, final = None, params
    adapter_dir = None
    if pc.method != "none":
        adapter_dir = save_peft(final, cfg, run_dir / "adapter",
                                base_model_name_or_path=job.model.source)
        print(f"wrote the adapter (HF PEFT format) to {adapter_dir}", flush=True)
    after, samples_after = evaluate(final, "after", transform) if train_done else ({}, None)
    metrics = {"params": n_model, "params_base": n_base, "trainable_params": n_trainable,
               **base_metrics, **before, **quantized_before, **after}
    if res is not None:
        metrics.update({"best_val_loss": res.best_val_loss, "best_step": res.best_step,
                        "final_train_loss": res.history[-1]["loss"] if res.history else None,
                        "train_tokens_per_s": res.tokens_per_s})
    results = {
        "stage": stage, "metrics": metrics, "data": data_stats,
        "history": res.history if res else [], "val_history": res.val_history if res else [],
        "samples": {"before": samples_before, "ptq": samples_ptq, "after": samples_after},
        "resumed_from": res.resumed_from if res else None,
        "checkpoint_fallbacks": res.checkpoint_fallbacks if res else [],
        "recipe": {"base": job.model.source,
                   "finetune": "none" if not train_done else (
                       "full" if pc.method == "none" else pc.method),
                   "quant": None if qc.method == "none" else {
                       **dataclasses.asdict(qc), "tensors": quant_formats},
                   "prune": prune_record,
                   "adapter": adapter_summary(final) or None,
                   "adapter_dir": None if adapter_dir is None else str(adapter_dir),
                   "train": dataclasses.asdict(tc), "data": dataclasses.asdict(d)},
        "config": resolved, "git_sha": sha, "versions": versions(), "machine": machine(),
        "wall_time_s": round(time.time() - t0, 1),
    }
    write_json_atomic(run_dir / "results.json", results)
    finish_run(wb, {k: v for k, v in metrics.items() if v is not None})
    print(f"wrote {run_dir / 'results.json'}")
    return results


main = hydra_app("finetune", FinetuneJob, run)

if __name__ == "__main__":
    main()
