"""Multi-process start-up and the one-writer rule.

`initialize` joins the JAX cluster before any device is touched: under SLURM (or any launcher
JAX's own cluster detection knows) with no settings, or with an explicit coordinator, process
count and id. A dead peer is noticed by the coordination service's heartbeat; the survivors
then exit with JAX's error instead of waiting forever in a collective (`heartbeat_timeout_s`).
Process 0 alone writes results, tables, GGUF files and W&B (`is_writer`); checkpoints are
written by every process through orbax, which coordinates them itself."""
from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import numpy as np


@dataclass
class DistributedCfg:
    """The `distributed` settings group. `enabled`: auto (join a cluster when SLURM runs more
    than one task, or when `coordinator` is set), true (always; JAX detects the cluster unless
    the three settings below are given), false (one process)."""
    enabled: str = "auto"
    coordinator: str | None = None     # host:port of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 100     # a peer silent this long is dead: every process exits
    initialization_timeout_s: int = 300
    cpu_collectives: str = "gloo"      # CPU cross-process collectives (gloo works on CPU hosts)


def wanted(cfg: DistributedCfg) -> bool:
    if str(cfg.enabled).lower() in ("true", "1", "yes"):
        return True
    if str(cfg.enabled).lower() in ("false", "0", "no"):
        return False
    if str(cfg.enabled).lower() != "auto":
        raise ValueError(f"distributed.enabled={cfg.enabled!r}: auto, true or false")
    return cfg.coordinator is not None or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(cfg: DistributedCfg) -> bool:
    """Join the cluster when `cfg` asks for one (idempotent); True when this is a
    multi-process job."""
    if not wanted(cfg):
        return False
    explicit = (cfg.coordinator, cfg.num_processes, cfg.process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("distributed: coordinator, num_processes and process_id are given "
                         f"together or not at all (got {explicit})")
    if not jax.distributed.is_initialized():
        # (asking for the backend here would start it, which initialize refuses; the setting
        # only concerns CPU devices)
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                                   initialization_timeout=cfg.initialization_timeout_s,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def to_host(tree):
    """Every leaf as a numpy array on every process (an all-gather across processes when a
    leaf is not fully addressable here, e.g. the gather before export)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree_util.tree_map(one, tree)


def local_rows(sharding, global_shape: tuple, axis: int) -> slice:
    """The contiguous range of dimension `axis` that this process's devices hold under
    `sharding` (what it must feed to `jax.make_array_from_process_local_data`)."""
    lo, hi = global_shape[axis], 0
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        s = idx[axis]
        start, stop = s.start or 0, global_shape[axis] if s.stop is None else s.stop
        lo, hi = min(lo, start), max(hi, stop)
    return slice(lo, hi)


def process0_alone(name: str, fn, params):
    """`fn(params)` on process 0 alone, for host work (writing files, running llama.cpp): in a
    multi-process job every process first gathers `params` to the host (a collective),
    process 0 runs `fn` on a mesh of its own devices (so nothing in it waits for the others),
    and the others wait for it at a barrier named `name`; they get None. One process:
    `fn(params)`."""
    if jax.process_count() == 1:
        return fn(params)
    from jax.experimental import multihost_utils

    from alpaca_jax.parallel.mesh import MeshCfg, make_mesh
    host = to_host(params)
    out = None
    if is_writer():
        with jax.set_mesh(make_mesh(MeshCfg(), devices=jax.local_devices())):
            out = fn(host)
    multihost_utils.sync_global_devices(name)
    return out
