"""`LinenMoELayer`: a thin Flax linen wrapper of moe_jax's expert-parallel MoE layer.

  layer = moe_jax.nn.LinenMoELayer(cfg, mesh)
  variables = layer.init(jax.random.key(0), x)
  y, state = layer.apply(variables, x, mutable=["intermediates"])
  stats = state["intermediates"]["moe_stats"][0]          # MoEStats

Params are boxed with their logical axes (`linen.LogicallyPartitioned`, mesh and rules attached:
`linen.get_partition_spec(variables)` gives the logical specs, `linen.logical_to_mesh_sharding(
..., mesh, rules)` the mesh ones). Init draws one key from the "params" stream and the params
are `init_moe_params(key, cfg)`. The call returns y and sows the `MoEStats` as the intermediate
"moe_stats". A parent model runs its layers with replicas by passing one `StackReplication`
(built from its params in apply; there are none yet in init) and each layer's index.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen

from moe_jax import moe_layer
from moe_jax.config import ExecutionConfig, MoEConfig
from moe_jax.nn import sharding
from moe_jax.replication import ReplicationConfig


class LinenMoELayer(linen.Module):
  """An expert-parallel MoE FFN on a ('data', 'expert') mesh (see `nnx_layer.MoELayer`).

  Attributes:
    moe_config: what the layer computes; mesh: the ('data', 'expert') mesh.
    execution: how it runs (None: `ExecutionConfig()`).
    replication: the `ReplicationConfig` the parent's `StackReplication` uses (informational:
      the parent builds the context; None: home slots only).
    rules: logical axis -> mesh axis rules (default `moe_jax.nn.DEFAULT_RULES`).
  """

  moe_config: MoEConfig
  mesh: Any
  execution: ExecutionConfig | None = None
  replication: ReplicationConfig | None = None
  rules: tuple = sharding.DEFAULT_RULES

  @linen.compact
  def __call__(self, x: jax.Array, *, token_mask: jax.Array | None = None, routing=None,
               replication=None, index: int | None = None) -> jax.Array:
    """x <f>[B, L, d] -> y <f>[B, L, d]; sows "moe_stats" (MoEStats) in "intermediates".

    `replication` (a `StackReplication` built by the parent from its params) runs the layer
    with the replicas placed one layer ahead; `index` is then the layer's position in it.
    """
    params = self._params()
    if replication is None:
      y, stats = moe_layer.moe_apply(params, x, self.moe_config, execution=self.execution,
                                     mesh=self.mesh, token_mask=token_mask, routing=routing)
    elif index is None or token_mask is not None:
      raise ValueError("LinenMoELayer with replication= needs index= (its position in the "
                       "StackReplication) and no token_mask (mark padding through routing=).")
    else:
      y, stats = replication(index, params, x, routing)
    self.sow("intermediates", "moe_stats", stats)
    return y

  def _params(self) -> dict:
    rules = sharding.check_rules(self.rules, self.mesh)
    axes = sharding.logical_axes(self.moe_config)
    # One key for all params, as init_moe_params takes; outside init linen may still call an
    # init function (for its shape), which then draws from the key it is given.
    values = (moe_layer.init_moe_params(self.make_rng("params"), self.moe_config)
              if self.is_initializing() else None)

    def init(key, name):
      return (values if values is not None
              else moe_layer.init_moe_params(key, self.moe_config))[name]

    return {name: self.param(name, linen.with_logical_partitioning(
        init, names, mesh=self.mesh, rules=rules), name) for name, names in axes.items()}
