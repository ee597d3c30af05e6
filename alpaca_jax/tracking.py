"""Weights & Biases: offline by default, disabled in tests, never blocking on a network.

`online` that cannot reach the server within `init_timeout` falls back to `offline` with a
warning, so a run on a machine without network still logs (sync later with `wandb sync`)."""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    mode: str = "offline"
    project: str = "alpaca_jax"
    group: str | None = None        # the sweep or experiment
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0


def start_run(lc: LoggerConfig, run_dir, job_type: str, config: dict):
    if lc.mode not in MODES:
        raise ValueError(f"logger.mode={lc.mode!r}; supported: {', '.join(MODES)}")
    from alpaca_jax.parallel.cluster import is_writer
    if not is_writer():       # one W&B run per job: process 0's
        lc = dataclasses.replace(lc, mode="disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    run_dir = Path(run_dir)
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / ".wandb-cache"))
    import wandb

    def init(mode):
        return wandb.init(project=lc.project, group=lc.group, job_type=job_type,
                          tags=list(lc.tags), config=config, mode=mode, dir=str(run_dir),
                          settings=wandb.Settings(init_timeout=lc.init_timeout, silent=True))
    try:
        return init(lc.mode)
    except Exception as e:  # wandb raises several types when the server is unreachable
        if lc.mode != "online":
            raise
        warnings.warn(f"W&B online init failed ({type(e).__name__}: {e}); logging offline "
                      f"under {run_dir}", RuntimeWarning, stacklevel=2)
        return init("offline")


def finish_run(run, summary: dict) -> None:
    import wandb

    for k, v in summary.items():
        run.summary[k] = v
    run.finish()
    wandb.teardown()  # the offline wandb-core process otherwise outlives finish()
