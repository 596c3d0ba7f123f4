"""Flax modules around moe_jax's expert-parallel MoE layer (imports Flax NNX and linen).

  from flax import nnx
  import moe_jax, moe_jax.nn

  layer = moe_jax.nn.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))       # NNX
  y, stats = layer(x)
  layer = moe_jax.nn.LinenMoELayer(cfg, mesh)                          # linen (stats sown)

`StackReplication` runs a model's MoE layers with one-layer-ahead replica placement; the
`ReplicationState` it returns is carried by the caller from step to step. Parameter sharding:
`DEFAULT_RULES` (logical axis -> mesh axis), overridable per layer (`rules=`).
"""

from moe_jax.nn.linen_layer import LinenMoELayer
from moe_jax.nn.nnx_layer import MoELayer
from moe_jax.nn.sharding import DEFAULT_RULES, logical_axes, mesh_spec, param_shardings
from moe_jax.nn.stack import StackReplication

__all__ = ["DEFAULT_RULES", "LinenMoELayer", "MoELayer", "StackReplication", "logical_axes",
           "mesh_spec", "param_shardings"]
