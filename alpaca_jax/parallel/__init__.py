"""Device meshes, logical-axis placement of the params tree, and multi-process start-up.

`mesh.py` builds the one `data x fsdp x tensor` mesh every stage runs on; `logical.py` names
each leaf's axes (layers, embed, heads, ...) and maps them to mesh axes through Flax's logical
partitioning rules; `cluster.py` joins a multi-process JAX cluster and says which process
writes files."""
from alpaca_jax.parallel.logical import (DEFAULT_RULES, batch_sharding, constrain_batch,
                                         logical_axes, param_shardings, place_tree,
                                         shardings_like)
from alpaca_jax.parallel.mesh import MeshCfg, make_mesh

__all__ = ["MeshCfg", "make_mesh", "DEFAULT_RULES", "logical_axes", "param_shardings",
           "place_tree", "shardings_like", "batch_sharding", "constrain_batch"]
