"""AdamW with warmup + cosine/linear/constant decay and global-norm clipping."""
from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(lr: float, steps: int, warmup_steps: int, kind: str = "cosine",
                  min_lr_ratio: float = 0.0):
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule={kind!r}; supported: {', '.join(SCHEDULES)}")
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"train.warmup_steps={warmup_steps} must lie in [0, steps={steps}]")
    decay_steps = max(1, steps - warmup_steps)
    end = lr * min_lr_ratio
    decay = {"cosine": optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio),
             "linear": optax.linear_schedule(lr, end, decay_steps),
             "constant": optax.constant_schedule(lr)}[kind]
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay],
                                [warmup_steps])


def _decay_mask(tree):
    # no weight decay on norm scales (the usual LLaMA recipe)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x is not None and "norm" not in jax.tree_util.keystr(p), tree)


def make_optimizer(lr: float, steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: float | None = 1.0, min_lr_ratio: float = 0.0):
    sched = make_schedule(lr, steps, warmup_steps, schedule, min_lr_ratio)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), sched
