"""The expert-parallel MoE layer: one `shard_map` wiring routing -> permute -> exchange ->
grouped matmul -> exchange back, with optional replica slots (their API: `moe_jax.replicas`).

Layout on a ('data', 'expert') mesh of Dd x De devices:
  tokens     [B, L, d] -> [Dd * T_shard, d], sharded over ('data', 'expert') jointly, so every
             device is a source of T_shard tokens (padding rows are added and masked if needed);
  experts    [E, ...] sharded over 'expert' (h = E / De home slots per device), replicated on 'data';
  replicas   [De * r, ...] sharded over 'expert' (r replica slots per device);
  slot table <int32>[De, h + r] replicated; r is its width minus h (no table: r = 0, and no
             replica exchange at all).
Each data row of the mesh runs its own expert-parallel exchange over the 'expert' axis.

Example:
  cfg = moe_jax.MoEConfig(num_experts=16, d_model=64, d_ff=128)
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  mesh = moe_jax.make_mesh(data=2, expert=4)
  y, stats = moe_jax.moe_apply(params, x, cfg, mesh=mesh)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from moe_jax import collectives
from moe_jax import layer_body
from moe_jax import mesh as mesh_lib
from moe_jax import placement
from moe_jax import replicas as replicas_lib
from moe_jax import routing as routing_lib
from moe_jax.config import ExecutionConfig, MoEConfig

TOKENS = P(("data", "expert"))


@struct.dataclass
class MoEStats:
  """What one MoE layer call did.

  Attributes:
    tokens_per_expert: <int32>[E] token-choices the router sent to each expert (before capacity).
    tokens_per_slot: <int32>[Dd, De, h + r] token-choices computed in each slot of each device.
    tokens_per_device: <int32>[Dd, De] token-choices computed on each device (after replication).
    dropped_choices: <int32>[] choices lost to capacity (0 in dropless mode).
    total_choices: <int32>[] choices the router dispatched.
    balancedness: <f32>[] mean / max of tokens_per_device.
    replica_bytes: <f32>[] expert-weight bytes copied into replica slots on the whole mesh.
    routing: the `Routing` (in the caller's token order, [B * L, ...]).
  """

  tokens_per_expert: jax.Array
  tokens_per_slot: jax.Array
  tokens_per_device: jax.Array
  dropped_choices: jax.Array
  total_choices: jax.Array
  balancedness: jax.Array
  replica_bytes: jax.Array
  routing: routing_lib.Routing


def init_moe_params(key: jax.Array, cfg: MoEConfig) -> dict:
  """{"router": [d, E], "wi": [E, d, f], "wo": [E, f, d]} (+ "wi_gate": [E, d, f] for silu)."""
  keys = jax.random.split(key, 4)
  e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
  dtype = cfg.jnp_dtype
  params = {
      "router": jax.random.normal(keys[0], (d, e), jnp.float32) * d ** -0.5,
      "wi": (jax.random.normal(keys[1], (e, d, f)) * d ** -0.5).astype(dtype),
      "wo": (jax.random.normal(keys[2], (e, f, d)) * f ** -0.5).astype(dtype),
  }
  if cfg.gated:
    params["wi_gate"] = (jax.random.normal(keys[3], (e, d, f)) * d ** -0.5).astype(dtype)
  return params


def moe_apply(params: dict, x: jax.Array, cfg: MoEConfig, *,
              execution: ExecutionConfig | None = None, mesh=None, slot_table=None,
              replica_weights: dict | None = None, token_mask: jax.Array | None = None,
              routing: routing_lib.Routing | None = None):
  """Applies the MoE layer.

  Args:
    params: from `init_moe_params`.
    x: <f>[B, L, d] tokens.
    cfg: the layer's `MoEConfig`.
    execution: how to run it (`ExecutionConfig`; default: dropless, backends chosen per platform).
    mesh: a ('data', 'expert') mesh; default: a 1 x 1 mesh on the first device.
    slot_table: optional <int32>[De, h + r] (`moe_jax.place`); default: home slots only (r = 0).
    replica_weights: optional output of `prefetch` for `slot_table`; fetched inside if omitted.
    token_mask: optional <bool>[B, L]; False marks padding tokens (not routed, output 0).
    routing: optional precomputed `Routing` over the B * L tokens (e.g. with a router-stage
      capacity rule applied); default: `top_k_route` with `params["router"]`.

  Returns:
    (y <f>[B, L, d], `MoEStats`).
  """
  execution = execution if execution is not None else ExecutionConfig()
  if mesh is None:
    mesh = mesh_lib.make_mesh(1, 1)
  num_data, num_devices = mesh_lib.axis_sizes(mesh)
  _check_inputs(params, x, cfg, num_data, mesh, token_mask)
  if slot_table is None:
    slot_table = placement.home_slot_table(cfg.num_experts, num_devices)
  placement.validate_slot_table(slot_table, cfg.num_experts, num_devices)
  slot_table = jnp.asarray(slot_table, jnp.int32)
  if replica_weights is not None:
    replicas_lib.check_replica_weights(replica_weights, params, slot_table)
  return _moe_apply_jit(params, x, slot_table, replica_weights, token_mask, routing, cfg=cfg,
                        execution=execution, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "execution", "mesh"))
def _moe_apply_jit(params, x, slot_table, replica_weights, token_mask, routing, *, cfg,
                   execution, mesh):
  num_data, num_devices = mesh_lib.axis_sizes(mesh)
  batch, length, d = x.shape
  h = cfg.num_experts // num_devices
  num_replica_slots = slot_table.shape[1] - h
  tokens = x.reshape(batch * length, d).astype(cfg.jnp_dtype)
  valid = (jnp.ones((batch * length,), bool) if token_mask is None
           else jnp.asarray(token_mask, bool).reshape(-1))
  if routing is None:
    routing = routing_lib.top_k_route(tokens, params["router"], top_k=cfg.top_k,
                                      renormalize=cfg.renormalize, token_mask=valid)
  shard = functools.partial(_to_shards, num_data=num_data, num_devices=num_devices)
  dispatch_mask = routing.dispatch_mask & valid[:, None]
  inputs = (shard(tokens), shard(routing.expert_ids), shard(routing.combine_weights),
            shard(dispatch_mask))
  # XLA:CPU: the routing's reductions (losses), then the layer's collectives, then the stats'
  # reductions, then whatever consumes y (see collectives.in_order).
  ordered = mesh_lib.is_cpu(mesh)
  routing, inputs = collectives.in_order(routing, inputs, enabled=ordered)

  body = functools.partial(layer_body.layer_body, cfg=cfg, execution=execution,
                           mode=replicas_lib.exchange_mode(execution),
                           prefetch_inside=replica_weights is None and num_replica_slots > 0,
                           ordered=ordered)
  home = replicas_lib.expert_weights(params)
  specs = {k: P("expert") for k in home}
  replicas = replica_weights if replica_weights is not None else {}
  y, tokens_per_slot, dropped = jax.shard_map(
      body, mesh=mesh,
      in_specs=(TOKENS,) * 4 + (specs, {k: P("expert") for k in replicas}, P()),
      out_specs=(TOKENS, P("data", "expert"), P()))(*inputs, home, replicas, slot_table)

  y = _from_shards(y, batch * length, num_data).reshape(batch, length, d)
  _, (expert_ids, counted) = collectives.in_order(y, (routing.expert_ids, dispatch_mask),
                                                  enabled=ordered)
  tokens_per_device = jnp.sum(tokens_per_slot, axis=-1)
  stats = MoEStats(
      tokens_per_expert=routing_lib.expert_counts(expert_ids, counted, cfg.num_experts),
      tokens_per_slot=tokens_per_slot, tokens_per_device=tokens_per_device,
      dropped_choices=dropped, total_choices=jnp.sum(counted.astype(jnp.int32)),
      balancedness=placement.balancedness(tokens_per_device),
      replica_bytes=replicas_lib.replica_bytes(slot_table, params, h) * num_data,
      routing=routing)
  stats, y = collectives.in_order(stats, y, enabled=ordered)
  return y, stats


def _to_shards(a, *, num_data, num_devices):
  """[B * L, ...] -> [Dd * T_shard, ...]: each data shard's tokens, padded to a multiple of De."""
  per_data = a.shape[0] // num_data
  padded = math.ceil(per_data / num_devices) * num_devices
  a = a.reshape((num_data, per_data) + a.shape[1:])
  a = jnp.pad(a, [(0, 0), (0, padded - per_data)] + [(0, 0)] * (a.ndim - 2))
  return a.reshape((num_data * padded,) + a.shape[2:])


def _from_shards(a, num_tokens, num_data):
  per_data = num_tokens // num_data
  a = a.reshape((num_data, -1) + a.shape[1:])[:, :per_data]
  return a.reshape((num_tokens,) + a.shape[2:])


def _check_inputs(params, x, cfg, num_data, mesh, token_mask):
  replicas_lib.check_experts_fit(cfg, mesh)
  if getattr(x, "ndim", None) != 3 or x.shape[-1] != cfg.d_model:
    raise ValueError(f"x must be [batch, length, d_model={cfg.d_model}], got shape "
                     f"{getattr(x, 'shape', None)}; reshape tokens to rank 3 with width d_model.")
  if x.shape[0] % num_data:
    raise ValueError(f"batch {x.shape[0]} is not divisible by the mesh's data axis ({num_data}); "
                     "pad the batch or choose a data axis that divides it.")
  if token_mask is not None and tuple(token_mask.shape) != tuple(x.shape[:2]):
    raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}, expected "
                     f"{tuple(x.shape[:2])} (batch, length).")
  expected = {"router": (cfg.d_model, cfg.num_experts),
              "wi": (cfg.num_experts, cfg.d_model, cfg.d_ff),
              "wo": (cfg.num_experts, cfg.d_ff, cfg.d_model)}
  if cfg.gated:
    expected["wi_gate"] = expected["wi"]
  for name, shape in expected.items():
    if name not in params:
      raise ValueError(f"params lack {name!r} (activation={cfg.activation!r} needs "
                       f"{sorted(expected)}); build them with moe_jax.init_moe_params(key, cfg).")
    if tuple(params[name].shape) != shape:
      raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}, expected {shape} "
                       "from the MoEConfig.")
