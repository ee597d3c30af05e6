"""The training loop: resumable, validated, guarded against non-finite losses."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from alpaca_jax.data.batching import PackedRows, batch_indices
from alpaca_jax.model.adapters import adapted
from alpaca_jax.train.checkpoint import Checkpointer
from alpaca_jax.train.optim import make_optimizer
from alpaca_jax.quant.qat import fixed, fixed_transform
from alpaca_jax.train.split import combine, split, train_all
from alpaca_jax.train.step import make_eval_fn, make_train_step


@dataclass
class TrainConfig:
    """Also the Hydra `train` group's schema (a plain dataclass so overrides can merge in)."""
    steps: int = 100
    batch_size: int = 8          # rows per micro-batch
    accum_steps: int = 1         # micro-batches per update
    lr: float = 2e-5
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float = 1.0
    seed: int = 0
    eval_every: int = 20
    eval_batch_size: int = 8
    save_every: int = 20
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    # positions per chunk of the next-token loss (0: the whole sequence): the float32 logits
    # then exist one [B, C, V] slice at a time (train/step.py: loss_sums)
    loss_chunk: int = 0


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    params: dict                      # the final parameters
    best_params: dict | None          # lowest validation loss (None without validation)
    history: list[dict] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_step: int | None = None
    resumed_from: int | None = None
    checkpoint_fallbacks: list[dict] = field(default_factory=list)
    tokens_per_s: float = 0.0


def evaluate_loss(params, rows: PackedRows, eval_fn, batch_size: int) -> float:
    """Mean NLL over every loss token of every row (rows padded to a fixed batch, masked)."""
    total = count = 0.0
    for k in range(0, len(rows), batch_size):
        idx = np.arange(k, min(k + batch_size, len(rows)))
        batch = rows.rows(np.concatenate([idx, np.full(batch_size - idx.size, idx[0])]))
        batch["loss_mask"][idx.size:] = 0.0
        s, n = eval_fn(params, batch)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def master_copy(x):
    """A float32 copy of a floating leaf (a plain copy of anything else)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32:
        return x.astype(jnp.float32)     # a new buffer already
    return jnp.copy(x)


def train(params, cfg, train_rows: PackedRows, val_rows: PackedRows | None, tc: TrainConfig,
          out_dir, *, trainable: Callable[[str], bool] = train_all, materialize=adapted,
          mesh=None, rules: dict | None = None, log: Callable[[dict], None] | None = None,
          fingerprint: dict | None = None, teacher=None) -> TrainResult:
    """Train the `trainable` part of `params`; resumes from `out_dir/checkpoints` when it holds a
    checkpoint of the same train config and `fingerprint` (anything else that shapes the
    trainable tree or the data, e.g. the adapter config). `teacher` (`train/distill.py:
    Teacher`) distils from it instead of the next-token loss; its record joins the fingerprint,
    so a run is not resumed under another objective or teacher.

    `mesh` (`parallel/mesh.py`): params, adapters and optimizer state are placed by the logical
    rules (`rules` override `parallel/logical.py: DEFAULT_RULES`), the step keeps them there,
    and each process feeds only the batch rows its devices hold."""
    if mesh is None:
        return _train(params, cfg, train_rows, val_rows, tc, out_dir, trainable, materialize,
                      None, rules, log, fingerprint, teacher)
    with jax.set_mesh(mesh):   # the forward's batch constraint reads the context mesh
        return _train(params, cfg, train_rows, val_rows, tc, out_dir, trainable, materialize,
                      mesh, rules, log, fingerprint, teacher)


def _train(params, cfg, train_rows, val_rows, tc, out_dir, trainable, materialize, mesh, rules,
           log, fingerprint, teacher) -> TrainResult:
    from alpaca_jax.parallel.cluster import local_rows
    from alpaca_jax.parallel.logical import (batch_sharding, param_shardings, place_tree,
                                             shardings_like)

    log = log or (lambda m: None)
    if teacher is not None:
        fingerprint = {**(fingerprint or {}), "distill": teacher.record}
    trainable_p, frozen = split(params, trainable)
    # the step donates its trainable buffers; copy once so the caller's params stay alive. The
    # copy is the float32 master copy: bf16/fp16 params train in fp32 (updates of ~lr * 1e-3
    # vanish in bf16), while frozen leaves stay in their stored dtype.
    trainable_p = jax.tree_util.tree_map(master_copy, trainable_p)
    placed = None
    if mesh is not None:
        placed = param_shardings(trainable_p, mesh, rules)[0]
        trainable_p = place_tree(trainable_p, placed)
        frozen = place_tree(frozen, param_shardings(frozen, mesh, rules)[0])
    optimizer, schedule = make_optimizer(tc.lr, tc.steps, tc.warmup_steps, tc.schedule,
                                         tc.weight_decay, tc.b1, tc.b2, clip_norm=tc.clip_norm,
                                         min_lr_ratio=tc.min_lr_ratio)
    opt_state = optimizer.init(trainable_p)
    if mesh is not None:    # AdamW's moments on their params' shardings, counts replicated
        placed = (placed, shardings_like(opt_state, trainable_p, placed, mesh))
        opt_state = place_tree(opt_state, placed[1])
    ckpt = Checkpointer(Path(out_dir) / "checkpoints", tc.keep_checkpoints, tc.async_checkpoints)
    result = TrainResult(params=params, best_params=None)
    start = 0

    def check_same_run(meta):
        # a setting added since the checkpoint was written counts at its default
        written = meta.get("train_config")
        if isinstance(written, dict):
            written = {**dataclasses.asdict(TrainConfig()), **written}
        if written != dataclasses.asdict(tc):
            raise ValueError(f"checkpoint {ckpt.directory} was written by a different train "
                             f"config: {meta.get('train_config')} != {dataclasses.asdict(tc)}")
        if meta.get("fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {ckpt.directory} was written by a different run: "
                             f"{meta.get('fingerprint')} != {fingerprint}")

    newest_meta = ckpt.latest_meta()
    if newest_meta is not None:   # before restoring: a different trainable tree would not fit
        check_same_run(newest_meta)
    restored = ckpt.restore_latest({"trainable": trainable_p, "opt_state": opt_state})
    if restored is not None:
        start, state, meta = restored
        check_same_run(meta)
        trainable_p, opt_state = state["trainable"], state["opt_state"]
        result.best_val_loss = meta["best_val_loss"]
        result.best_step = meta["best_step"]
        result.history, result.val_history = meta["history"], meta["val_history"]
        result.resumed_from = start
    result.checkpoint_fallbacks = ckpt.fallbacks

    step_fn = make_train_step(cfg, optimizer, materialize, seed=tc.seed,
                              objective=None if teacher is None else teacher.objective,
                              shardings=placed, loss_chunk=tc.loss_chunk)
    teacher_p = None if teacher is None else (
        teacher.params if mesh is None else
        place_tree(teacher.params, param_shardings(teacher.params, mesh, rules)[0]))
    # a K-quant grid is rounded once per evaluation, not at every batch (`quant.qat.fixed`)
    eval_fn = make_eval_fn(cfg, fixed_transform(materialize), chunk=tc.loss_chunk)
    rows_per_step = tc.batch_size * tc.accum_steps
    tokens_done, t_run = 0.0, None

    def meta(step):
        return {"step": step, "best_val_loss": result.best_val_loss,
                "best_step": result.best_step, "history": result.history,
                "val_history": result.val_history, "train_config": dataclasses.asdict(tc),
                "fingerprint": fingerprint}

    for step in range(start, tc.steps):
        idx = batch_indices(len(train_rows), rows_per_step, step, tc.seed)
        if mesh is None:
            batch = {k: v.reshape(tc.accum_steps, tc.batch_size, -1)
                     for k, v in train_rows.rows(idx).items()}
        else:   # rows [accum, B]: B over data x fsdp; this process reads only its own rows
            shape = (tc.accum_steps, tc.batch_size)
            sh = batch_sharding(mesh, shape + (1,), axis=1)
            idx = idx.reshape(shape)[:, local_rows(sh, shape + (1,), 1)]
            batch = {k: jax.make_array_from_process_local_data(
                sh, v.reshape(*idx.shape, -1), shape + (v.shape[-1],))
                for k, v in train_rows.rows(idx.reshape(-1)).items()}
        if t_run is None and step > start:
            t_run = time.perf_counter()  # throughput excludes the compiling first step
        trainable_p, opt_state, m = step_fn(trainable_p, frozen, opt_state, batch, step,
                                            teacher_p)
        m = {k: float(v) for k, v in m.items()}
        if not m["finite"]:
            ckpt.wait()
            raise NonFiniteLossError(
                f"step {step + 1}: loss {m['loss']} / grad norm {m['grad_norm']} is not finite; "
                f"the update was not applied. Last good checkpoint: step "
                f"{ckpt.latest_step()} in {ckpt.directory / 'latest'}")
        if t_run is not None:
            tokens_done += m["tokens"]
        entry = {"step": step + 1, "loss": m["loss"], "grad_norm": m["grad_norm"],
                 "lr": float(schedule(step)), "tokens": m["tokens"],
                 **{k: m[k] for k in ("nll", "kd") if k in m}}   # a distillation's two terms
        result.history.append(entry)
        log(entry)
        last = step + 1 == tc.steps
        if val_rows is not None and ((step + 1) % tc.eval_every == 0 or last):
            val = evaluate_loss(fixed(combine(trainable_p, frozen), materialize)[0], val_rows,
                                eval_fn, tc.eval_batch_size)
            result.val_history.append({"step": step + 1, "val_loss": val})
            log({"step": step + 1, "val_loss": val})
            if val < result.best_val_loss:
                result.best_val_loss, result.best_step = val, step + 1
                ckpt.save_best(step + 1, {"trainable": trainable_p}, meta(step + 1))
        if (step + 1) % tc.save_every == 0 or last:
            ckpt.save(step + 1, {"trainable": trainable_p, "opt_state": opt_state}, meta(step + 1))
    ckpt.wait()
    if t_run is not None:
        result.tokens_per_s = tokens_done / max(time.perf_counter() - t_run, 1e-9)
    result.params = combine(trainable_p, frozen)
    best = ckpt.restore_best({"trainable": trainable_p})
    if best is not None:
        result.best_params = combine(best[1]["trainable"], frozen)
    ckpt.close()
    return result
