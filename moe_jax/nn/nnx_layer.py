"""`MoELayer`: moe_jax's expert-parallel MoE layer as a Flax NNX module.

  layer = moe_jax.nn.MoELayer(cfg, mesh=mesh, rngs=nnx.Rngs(0))
  y, stats = layer(x)                    # x <f>[B, L, d] -> y <f>[B, L, d], MoEStats

Params are `nnx.Param`s named as `moe_jax.init_moe_params` names them (router, wi, wo, wi_gate,
router_bias), placed on `mesh` at construction by the sharding rules and carrying their logical
axes as metadata (`out_sharding`, `sharding_rules`), so `nnx.get_partition_spec(nnx.state(m))`
gives their mesh specs. Init: the layer draws one key from `rngs.params()` and its params are
`init_moe_params(key, cfg)`, so `MoELayer(cfg, mesh=m, rngs=nnx.Rngs(0))` holds exactly
`init_moe_params(nnx.Rngs(0).params(), cfg)`. The call is `moe_apply` on those params.
"""

from __future__ import annotations

import jax
from flax import nnx

from moe_jax import moe_layer
from moe_jax import routing as routing_lib
from moe_jax.config import ExecutionConfig, MoEConfig
from moe_jax.nn import sharding
from moe_jax.nn.stack import StackReplication
from moe_jax.replication import ReplicationConfig


class MoELayer(nnx.Module):
  """An expert-parallel MoE FFN on a ('data', 'expert') mesh.

  Args:
    moe_config: what the layer computes (`MoEConfig`).
    mesh: the ('data', 'expert') mesh (`moe_jax.make_mesh`); E must split over 'expert'.
    rngs: `nnx.Rngs` with a "params" (or default) stream.
    execution: how it runs (`ExecutionConfig`; default: dropless, backends per platform).
    replication: the `ReplicationConfig` a `StackReplication.of(...)` of these layers uses
      (None: the layer runs home slots only).
    rules: logical axis -> mesh axis rules (default `moe_jax.nn.DEFAULT_RULES`).
  """

  def __init__(self, moe_config: MoEConfig, *, mesh: jax.sharding.Mesh, rngs: nnx.Rngs,
               execution: ExecutionConfig | None = None,
               replication: ReplicationConfig | None = None, rules=sharding.DEFAULT_RULES):
    _check_configs(moe_config, execution, replication)
    self.moe_config, self.mesh = moe_config, mesh
    self.execution = execution if execution is not None else ExecutionConfig()
    self.replication = replication
    self.rules = sharding.check_rules(rules, mesh)
    shardings = sharding.param_shardings(moe_config, mesh, self.rules)
    values = moe_layer.init_moe_params(rngs.params(), moe_config)
    for name, axes in sharding.logical_axes(moe_config).items():
      setattr(self, name, nnx.Param(jax.device_put(values[name], shardings[name]),
                                    out_sharding=axes, sharding_rules=self.rules,
                                    eager_sharding=False))

  def moe_params(self) -> dict:
    """The params as a plain dict in `init_moe_params` layout (what `moe_apply` takes)."""
    return {name: getattr(self, name)[...] for name in sharding.logical_axes(self.moe_config)}

  def __call__(self, x: jax.Array, *, token_mask: jax.Array | None = None,
               routing: routing_lib.Routing | None = None,
               replication: StackReplication | None = None, index: int | None = None):
    """x <f>[B, L, d] -> (y <f>[B, L, d], `MoEStats`).

    Args:
      token_mask: optional <bool>[B, L]; False marks padding (not routed, output 0).
      routing: optional precomputed `Routing` of the B * L tokens.
      replication: this forward's `StackReplication`: the layer runs with the replicas it
        placed one layer ahead (default: home slots only).
      index: the layer's position in `replication` (default: looked up by identity).
    """
    params = self.moe_params()
    if replication is None:
      return moe_layer.moe_apply(params, x, self.moe_config, execution=self.execution,
                                 mesh=self.mesh, token_mask=token_mask, routing=routing)
    if token_mask is not None:
      raise ValueError("token_mask with replication: the stack runner routes every token; mark "
                       "padding through routing= (a Routing whose dispatch_mask drops it).")
    index = replication.index_of(self) if index is None else index
    return replication(index, params, x, routing)


def _check_configs(moe_config, execution, replication):
  for value, cls, name in ((moe_config, MoEConfig, "moe_config"),
                           (execution, ExecutionConfig, "execution"),
                           (replication, ReplicationConfig, "replication")):
    if not isinstance(value, cls) and not (value is None and name != "moe_config"):
      raise ValueError(f"MoELayer {name} must be a moe_jax {cls.__name__}, got "
                       f"{type(value).__name__}.")
