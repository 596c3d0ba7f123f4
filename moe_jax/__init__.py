"""moe_jax: expert-parallel Mixture-of-Experts inference with predictive expert replication.

  import moe_jax
  cfg = moe_jax.MoEConfig(num_experts=16, top_k=1, d_model=64, d_ff=128)
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  mesh = moe_jax.make_mesh(data=2, expert=4)
  y, stats = moe_jax.moe_apply(params, x, cfg, mesh=mesh)
"""

from moe_jax.config import ExecutionConfig, MoEConfig
from moe_jax.mesh import make_mesh
from moe_jax.moe_fn import DefaultMoE, MoEFn
from moe_jax.moe_layer import MoEStats, init_moe_params, moe_apply
from moe_jax.placement import balancedness, home_slot_table, maxvio, validate_slot_table
from moe_jax.replicas import Replicas, empty_replicas, place, prefetch, refresh, replica_columns
from moe_jax.routing import Routing, top_k_route

__version__ = "0.1.0"

__all__ = [
    "DefaultMoE", "ExecutionConfig", "MoEConfig", "MoEFn", "MoEStats", "Replicas", "Routing",
    "balancedness", "empty_replicas", "home_slot_table", "init_moe_params", "make_mesh", "maxvio",
    "moe_apply", "place", "prefetch", "refresh", "replica_columns", "top_k_route",
    "validate_slot_table",
]
