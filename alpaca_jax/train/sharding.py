"""One mesh with `data` and `fsdp` axes, Auto axis types (docs/ARCHITECTURE.md, traps: the Explicit default makes
`with_sharding_constraint` fail). Params are sharded over `fsdp` along their largest divisible
axis; batches over both axes along the batch dimension."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    n = jax.device_count()
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def param_spec(shape, fsdp: int) -> P:
    if fsdp == 1 or not shape:
        return P()
    candidates = [a for a in range(len(shape)) if shape[a] % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def shard_tree(tree, mesh: Mesh):
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, param_spec(np.shape(x), fsdp))), tree)


def shard_batch(batch: dict, mesh: Mesh, batch_axis: int = 1):
    """Leaves `[accum, B, T]`: B split over data x fsdp."""
    def put(x):
        spec = [None] * x.ndim
        spec[batch_axis] = ("data", "fsdp")
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))
    return jax.tree_util.tree_map(put, batch)
