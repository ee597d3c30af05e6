"""The one device mesh: axes `data` (batch), `fsdp` (batch, and the params' `embed` axis) and
`tensor` (heads, MLP and vocabulary axes), every axis type Auto (`with_sharding_constraint`
with a bare PartitionSpec fails under the Explicit default; docs/ARCHITECTURE.md, traps)."""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


@dataclass
class MeshCfg:
    """The `mesh` settings group. Sizes multiply to the device count over all processes;
    one of them may be -1 (the rest). `rules` override `DEFAULT_RULES` (`parallel/logical.py`)
    by logical axis name: `{embed: fsdp, mlp: tensor, layers: null}`; a list value shards one
    logical axis over several mesh axes."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict = field(default_factory=dict)

    def sizes(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        for name, s in zip(AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"mesh.{name}={s}: a mesh axis is a positive size or -1 (the "
                                 "rest of the devices)")
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh: only one axis may be -1, got data={self.data} "
                             f"fsdp={self.fsdp} tensor={self.tensor}")
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh: {n_devices} devices do not divide by the fixed axes "
                                 f"(product {known}) of data={self.data} fsdp={self.fsdp} "
                                 f"tensor={self.tensor}")
            sizes[sizes.index(-1)] = n_devices // known
        elif known != n_devices:
            raise ValueError(f"mesh: data={self.data} x fsdp={self.fsdp} x tensor={self.tensor}"
                             f" = {known} devices, but the job has {n_devices}")
        return tuple(sizes)


def make_mesh(cfg: MeshCfg | None = None, devices=None) -> Mesh:
    """The mesh of `cfg` over `devices` (default: every device of every process)."""
    cfg = cfg or MeshCfg()
    devices = jax.devices() if devices is None else list(devices)
    shape = cfg.sizes(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
