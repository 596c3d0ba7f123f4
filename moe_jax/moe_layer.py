"""The expert-parallel MoE layer: one `shard_map` wiring routing -> permute -> dispatch ->
grouped matmul -> combine, with optional replica slots.

Layout on a ('data', 'expert') mesh of Dd x De devices:
  tokens     [B, L, d] -> [Dd * T_shard, d], sharded over ('data', 'expert') jointly, so every
             device is a source of T_shard tokens (padding rows are added and masked if needed);
  experts    [E, ...] sharded over 'expert' (h = E / De home slots per device), replicated on 'data';
  replicas   [De * r, ...] sharded over 'expert' (r replica slots per device);
  slot table <int32>[De, h + r] replicated.
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
from moe_jax import dispatch
from moe_jax import mesh as mesh_lib
from moe_jax import placement
from moe_jax import routing as routing_lib
from moe_jax.config import MoEConfig

TOKENS = P(("data", "expert"))
EXPERT_WEIGHT_NAMES = ("wi", "wo", "wi_gate")


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


def expert_weights(params: dict) -> dict:
  return {k: params[k] for k in EXPERT_WEIGHT_NAMES if k in params}


def place(load: jax.Array, cfg: MoEConfig, *, mesh, previous_table=None,
          stickiness: float = 0.0) -> jax.Array:
  """Slot table <int32>[De, h + r] balancing the per-expert `load` <f32>[E] over the mesh.

  Computed whole on every device (`mesh.on_every_device`), so inside a jitted step it costs no
  collective beyond what makes `load` replicated."""
  _, num_devices = mesh_lib.axis_sizes(mesh)
  _check_experts_fit(cfg, num_devices)
  run = lambda load, previous: placement.place(load, num_devices, cfg.num_replica_slots,
                                               previous_table=previous, stickiness=stickiness)
  if previous_table is None:
    return mesh_lib.on_every_device(lambda load: run(load, None), mesh)(load)
  return mesh_lib.on_every_device(run, mesh)(load, jnp.asarray(previous_table, jnp.int32))


def prefetch(params: dict, slot_table: jax.Array, cfg: MoEConfig, *, mesh) -> dict:
  """Replica weights {name: <f>[De * r, ...]} (sharded over 'expert') for `slot_table`.

  Call it as soon as the table is known (e.g. one layer early) and pass the result to `moe_apply`
  as `replica_weights`; it reads only the table and the home weights.
  """
  _, num_devices = mesh_lib.axis_sizes(mesh)
  _check_experts_fit(cfg, num_devices)
  placement.validate_slot_table(slot_table, cfg.num_experts, num_devices, cfg.num_replica_slots)
  return _prefetch_jit(expert_weights(params), jnp.asarray(slot_table, jnp.int32), cfg=cfg,
                       mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def _prefetch_jit(home, slot_table, *, cfg, mesh):
  mode = _exchange_mode(cfg)

  def body(home, table):
    return collectives.prefetch_replicas(home, table, mode=mode)

  specs = {k: P("expert") for k in home}
  return jax.shard_map(body, mesh=mesh, in_specs=(specs, P()), out_specs=specs)(home, slot_table)


def refresh(params: dict, slot_table: jax.Array, held_table: jax.Array, held_weights: dict,
            cfg: MoEConfig, *, mesh) -> tuple[dict, jax.Array]:
  """Replica weights for `slot_table`, reusing the replicas already held for `held_table`.

  Only replica slots whose expert changed are fetched: with the ragged exchange (GPU/TPU) the
  others move no bytes; on the padded CPU fallback each replica column is exchanged on its own,
  under a `lax.cond` that skips it when no device's slot in that column changed (the predicate
  comes from the replicated tables, so every device agrees), so a refresh of one slot moves one
  column of cells instead of all r.
  `held_weights` must be what `prefetch`/`refresh` returned for `held_table` with these same
  `params`: resident replicas are copies, so start again from empty slots when params change.

  Args:
    params: the layer's params (home experts sharded over 'expert').
    slot_table, held_table: <int32>[De, h + r] the new table and the one the replicas hold.
    held_weights: {name: <f>[De * r, ...]} the replicas of `held_table`.

  Returns:
    ({name: <f>[De * r, ...]} replicas of `slot_table`,
     <f32>[] expert-weight bytes fetched into replica slots on the whole mesh).
  """
  num_data, num_devices = mesh_lib.axis_sizes(mesh)
  h = cfg.num_experts // num_devices

  def diff(slot_table, held_table):
    changed = slot_table[:, h:] != held_table[:, h:]                           # [De, r]
    fetch = slot_table.at[:, h:].set(jnp.where(changed, slot_table[:, h:], -1))
    return changed, fetch, jnp.any(changed, axis=0)

  changed, fetch_table, column_changed = mesh_lib.on_every_device(diff, mesh)(
      jnp.asarray(slot_table, jnp.int32), jnp.asarray(held_table, jnp.int32))
  home = expert_weights(params)
  fetched_bytes = replica_bytes(fetch_table, params, h) * num_data
  if _exchange_mode(cfg) != "padded":
    return _merge_columns(held_weights, _prefetch_jit(home, fetch_table, cfg=cfg, mesh=mesh),
                          changed, 0, mesh=mesh), fetched_bytes
  weights = dict(held_weights)
  for c in range(cfg.num_replica_slots):
    def fetch_column(weights, c=c):
      column_table = jnp.concatenate([fetch_table[:, :h], fetch_table[:, h + c:h + c + 1]], 1)
      fetched = _prefetch_jit(home, column_table, cfg=cfg, mesh=mesh)        # {k: [De, ...]}
      return _merge_columns(weights, fetched, changed[:, c:c + 1], c, mesh=mesh)
    weights = jax.lax.cond(column_changed[c], fetch_column, lambda weights: weights, weights)
  return weights, fetched_bytes


def _merge_columns(held: dict, fetched: dict, changed: jax.Array, first: int, *, mesh) -> dict:
  """`held` {k: [De * r, ...]} with replica columns first .. first + n - 1 set to `fetched`
  {k: [De * n, ...]} where `changed` <bool>[De, n].

  Each device rewrites its own cells in place: a dynamic-slice and a dynamic-update-slice of the
  same cells of its local [r, ...] buffer. (Written on the global array, a masked scatter made
  XLA:CPU copy both whole replica buffers in and out of the refresh's `cond` branch.)
  """
  def local(held, fetched, changed):                          # changed: [1, n]
    out = {}
    for k, w in held.items():
      count = fetched[k].shape[0]
      cells = jax.lax.dynamic_slice_in_dim(w, first, count, axis=0)           # [n, ...]
      new = jnp.where(changed.reshape((count,) + (1,) * (w.ndim - 1)), fetched[k], cells)
      out[k] = jax.lax.dynamic_update_slice_in_dim(w, new, first, axis=0)
    return out

  specs = {k: P("expert") for k in held}
  return jax.shard_map(local, mesh=mesh, in_specs=(specs, specs, P("expert")), out_specs=specs)(
      held, fetched, changed)


def empty_replicas(params: dict, cfg: MoEConfig, *, mesh) -> dict:
  """{name: zeros <f>[De * r, ...]} sharded over 'expert': the replicas of the home-only table."""
  _, num_devices = mesh_lib.axis_sizes(mesh)
  sharding = jax.sharding.NamedSharding(mesh, P("expert"))
  shapes = {k: ((num_devices * cfg.num_replica_slots,) + w.shape[1:], w.dtype)
            for k, w in expert_weights(params).items()}
  make = jax.jit(lambda: {k: jnp.zeros(s, d) for k, (s, d) in shapes.items()},
                 out_shardings={k: sharding for k in shapes})
  return make()


def moe_apply(params: dict, x: jax.Array, cfg: MoEConfig, *, mesh=None, slot_table=None,
              replica_weights: dict | None = None, token_mask: jax.Array | None = None,
              routing: routing_lib.Routing | None = None):
  """Applies the MoE layer.

  Args:
    params: from `init_moe_params`.
    x: <f>[B, L, d] tokens.
    cfg: the layer's `MoEConfig`.
    mesh: a ('data', 'expert') mesh; default: a 1 x 1 mesh on the first device.
    slot_table: optional <int32>[De, h + r]; default: home slots only.
    replica_weights: optional output of `prefetch` for `slot_table`; computed inside if omitted.
    token_mask: optional <bool>[B, L]; False marks padding tokens (not routed, output 0).
    routing: optional precomputed `Routing` over the B * L tokens (e.g. with a router-stage
      capacity rule applied); default: `top_k_route` with `params["router"]`.

  Returns:
    (y <f>[B, L, d], `MoEStats`).
  """
  if mesh is None:
    mesh = mesh_lib.make_mesh(1, 1)
  num_data, num_devices = mesh_lib.axis_sizes(mesh)
  _check_inputs(params, x, cfg, num_data, num_devices, token_mask)
  if slot_table is None:
    slot_table = placement.home_slot_table(cfg.num_experts, num_devices, cfg.num_replica_slots)
  placement.validate_slot_table(slot_table, cfg.num_experts, num_devices, cfg.num_replica_slots)
  slot_table = jnp.asarray(slot_table, jnp.int32)

  if replica_weights is not None:
    _check_replica_weights(replica_weights, expert_weights(params), num_devices,
                           cfg.num_replica_slots)
  return _moe_apply_jit(params, x, slot_table, replica_weights, token_mask, routing, cfg=cfg,
                        mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"))
def _moe_apply_jit(params, x, slot_table, replica_weights, token_mask, routing, *, cfg, mesh):
  num_data, num_devices = mesh_lib.axis_sizes(mesh)
  batch, length, d = x.shape
  h = cfg.num_experts // num_devices
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

  body = functools.partial(dispatch.layer_body, cfg=cfg, mode=_exchange_mode(cfg),
                           prefetch_inside=replica_weights is None and cfg.num_replica_slots > 0,
                           ordered=ordered)
  home = expert_weights(params)
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
      replica_bytes=replica_bytes(slot_table, params, h) * num_data,
      routing=routing)
  stats, y = collectives.in_order(stats, y, enabled=ordered)
  return y, stats


def replica_bytes(slot_table: jax.Array, params: dict, num_home: int) -> jax.Array:
  """Bytes of expert weights one expert-axis group copies to fill the table's replica slots."""
  per_expert = sum(math.prod(w.shape[1:]) * w.dtype.itemsize
                   for w in expert_weights(params).values())
  return jnp.sum(slot_table[:, num_home:] >= 0).astype(jnp.float32) * float(per_expert)


def _exchange_mode(cfg: MoEConfig) -> str:
  if cfg.all_to_all != "auto":
    return cfg.all_to_all
  return "padded" if jax.default_backend() == "cpu" else "ragged"


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


def _check_experts_fit(cfg, num_devices):
  if cfg.num_experts % num_devices:
    raise ValueError(
        f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis "
        f"({num_devices}); choose an expert axis that divides {cfg.num_experts}.")


def _check_inputs(params, x, cfg, num_data, num_devices, token_mask):
  _check_experts_fit(cfg, num_devices)
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


def _check_replica_weights(replica_weights, home, num_devices, num_replica_slots):
  for name, w in home.items():
    expected = (num_devices * num_replica_slots,) + tuple(w.shape[1:])
    got = tuple(replica_weights[name].shape) if name in replica_weights else None
    if got != expected:
      raise ValueError(f"replica_weights[{name!r}] has shape {got}, expected {expected}; "
                       "compute them with moe_jax.prefetch(params, slot_table, cfg, mesh=mesh).")
