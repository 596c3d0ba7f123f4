"""The expert-parallel MoE layer: one `shard_map` wiring routing -> permute -> exchange ->
grouped matmul -> exchange back, with optional replica slots (their API: `moe_jax.replicas`).

Layout on a ('data', 'expert') mesh of Dd x De devices:
  tokens     [B, L, d] -> [Dd * T_shard, d], sharded over ('data', 'expert') jointly, so every
             device is a source of T_shard tokens (padding rows are added and masked if needed);
  experts    [E, ...] sharded over 'expert' (h = E / De home slots each), replicated on 'data';
  replicas   a `Replicas` (`moe_jax.prefetch`): columns <int32>[De, r] replicated, weights
             [De * r, ...] sharded over 'expert' (r replica slots per device); none: r = 0, and
             no replica exchange at all. The slot table <int32>[De, h + r] is built inside from
             the fixed home columns and the replica columns.
Each data row of the mesh runs its own expert-parallel exchange over the 'expert' axis.

Never a silent wrong answer: a token whose router input or logits are not finite is routed to no
expert (it takes no capacity from clean tokens), its output row is NaN and it is counted in
`MoEStats.non_finite_tokens`; replica columns that are invalid (checked on the host when
concrete, else on device) make every output row NaN.

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
    non_finite_tokens: <int32>[] unmasked tokens whose router input row or router logits were not
      finite: routed nowhere, output NaN.
    balancedness: <f32>[] mean / max of tokens_per_device.
    replica_bytes: <f32>[] expert-weight bytes copied into replica slots on the whole mesh.
    routing: the `Routing` (in the caller's token order, [B * L, ...]).
  """

  tokens_per_expert: jax.Array
  tokens_per_slot: jax.Array
  tokens_per_device: jax.Array
  dropped_choices: jax.Array
  total_choices: jax.Array
  non_finite_tokens: jax.Array
  balancedness: jax.Array
  replica_bytes: jax.Array
  routing: routing_lib.Routing


def init_moe_params(key: jax.Array, cfg: MoEConfig) -> dict:
  """{"router": [d, E], "wi": [E, d, f], "wo": [E, f, d]} (+ "wi_gate": [E, d, f] for silu,
  "router_bias": zeros [E] for the sigmoid router)."""
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
  if cfg.router == "sigmoid":
    params["router_bias"] = jnp.zeros((e,), jnp.float32)
  return params


def moe_apply(params: dict, x: jax.Array, cfg: MoEConfig, *,
              execution: ExecutionConfig | None = None, mesh=None,
              replicas: replicas_lib.Replicas | None = None, token_mask: jax.Array | None = None,
              routing: routing_lib.Routing | None = None):
  """Applies the MoE layer.

  Args:
    params: from `init_moe_params`.
    x: <f>[B, L, d] tokens.
    cfg: the layer's `MoEConfig`.
    execution: how to run it (`ExecutionConfig`; default: dropless, backends chosen per platform).
    mesh: a ('data', 'expert') mesh; default: a 1 x 1 mesh on the first device.
    replicas: optional `Replicas` (`moe_jax.prefetch` / `refresh`): r replica slots per device
      with their weights; default: home slots only (r = 0).
    token_mask: optional <bool>[B, L]; False marks padding tokens (not routed, output 0).
    routing: optional precomputed `Routing` over the B * L tokens (e.g. with a router-stage
      capacity rule applied); default: `routing.route` by the config's rule.

  Returns:
    (y <f>[B, L, d], `MoEStats`). Rows of non-finite tokens are NaN; so is every row if
    `replicas` holds invalid columns that could not be checked on the host (inside jit).
  """
  execution = execution if execution is not None else ExecutionConfig()
  if mesh is None:
    mesh = mesh_lib.make_mesh(1, 1)
  num_data, num_devices = mesh_lib.axis_sizes(mesh)
  _check_inputs(params, x, cfg, num_data, mesh, token_mask)
  if replicas is not None:
    replicas_lib.check_replicas(replicas, params, cfg, num_devices)
  return _moe_apply_jit(params, x, replicas, token_mask, routing, cfg=cfg, execution=execution,
                        mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "execution", "mesh"))
def _moe_apply_jit(params, x, replicas, token_mask, routing, *, cfg, execution, mesh):
  num_data, num_devices = mesh_lib.axis_sizes(mesh)
  batch, length, d = x.shape
  tokens = x.reshape(batch * length, d).astype(cfg.jnp_dtype)
  valid = (jnp.ones((batch * length,), bool) if token_mask is None
           else jnp.asarray(token_mask, bool).reshape(-1))
  if routing is None:
    routing = routing_lib.route(tokens, params, cfg, token_mask=valid)
  # A given routing may dispatch a non-finite token; it is routed nowhere all the same.
  non_finite = valid & ~routing_lib.finite_tokens(tokens, routing.logits)      # [B * L]
  dispatch_mask = routing.dispatch_mask & (valid & ~non_finite)[:, None]       # [B * L, k]
  combine_weights = jnp.where(dispatch_mask, routing.combine_weights, 0.0)     # no 0 * NaN
  columns = jnp.zeros((num_devices, 0), jnp.int32) if replicas is None else replicas.columns
  replica_weights = replicas.weights if columns.shape[1] else {}       # r = 0: no replica segment
  slot_table = placement.with_home(columns, cfg.num_experts)                   # [De, h + r]
  shard = functools.partial(_to_shards, num_data=num_data, num_devices=num_devices)
  inputs = (shard(tokens), shard(routing.expert_ids), shard(combine_weights),
            shard(dispatch_mask))
  # XLA:CPU: the routing's reductions (losses) and the replica prefetch, then the layer's
  # collectives, then the stats' reductions, then whatever consumes y (see collectives.in_order).
  ordered = mesh_lib.is_cpu(mesh)
  (routing, replica_weights), inputs = collectives.in_order((routing, replica_weights), inputs,
                                                            enabled=ordered)
  body = functools.partial(layer_body.layer_body, cfg=cfg, execution=execution,
                           mode=replicas_lib.exchange_mode(execution), ordered=ordered)
  home = replicas_lib.expert_weights(params)
  specs = {k: P("expert") for k in home}
  y, tokens_per_slot, dropped = jax.shard_map(
      body, mesh=mesh,
      in_specs=(TOKENS,) * 4 + (specs, {k: P("expert") for k in replica_weights}, P()),
      out_specs=(TOKENS, P("data", "expert"), P()))(*inputs, home, replica_weights, slot_table)

  y = _from_shards(y, batch * length, num_data)
  # Loud, never silently wrong: NaN rows for non-finite tokens, all rows for invalid columns.
  poisoned = non_finite | ~placement.columns_valid(columns, cfg.num_experts)
  y = jnp.where(poisoned[:, None], jnp.nan, y).astype(y.dtype).reshape(batch, length, d)
  _, (expert_ids, counted) = collectives.in_order(y, (routing.expert_ids, dispatch_mask),
                                                  enabled=ordered)
  stats = _stats(routing, expert_ids, counted, non_finite, tokens_per_slot, dropped,
                 replicas_lib.replica_bytes(columns, params) * num_data, cfg=cfg)
  stats, y = collectives.in_order(stats, y, enabled=ordered)
  return y, stats


def _stats(routing, expert_ids, counted, non_finite, tokens_per_slot, dropped, replica_bytes, *,
           cfg) -> MoEStats:
  tokens_per_device = jnp.sum(tokens_per_slot, axis=-1)
  return MoEStats(
      tokens_per_expert=routing_lib.expert_counts(expert_ids, counted, cfg.num_experts),
      tokens_per_slot=tokens_per_slot, tokens_per_device=tokens_per_device,
      dropped_choices=dropped, total_choices=jnp.sum(counted.astype(jnp.int32)),
      non_finite_tokens=jnp.sum(non_finite.astype(jnp.int32)),
      balancedness=placement.balancedness(tokens_per_device), replica_bytes=replica_bytes,
      routing=routing)


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
  if "router_bias" in params:
    if cfg.router != "sigmoid":
      raise ValueError(f"params have a 'router_bias' but the {cfg.router!r} router ignores it; "
                       "use MoEConfig(router='sigmoid') or drop the bias.")
    expected["router_bias"] = (cfg.num_experts,)
  for name, shape in expected.items():
    if name not in params:
      raise ValueError(f"params lack {name!r} (activation={cfg.activation!r} needs "
                       f"{sorted(expected)}); build them with moe_jax.init_moe_params(key, cfg).")
    if tuple(params[name].shape) != shape:
      raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}, expected {shape} "
                       "from the MoEConfig.")
