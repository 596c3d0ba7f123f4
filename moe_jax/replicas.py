"""The replica API of one MoE layer: place replicas, fetch their weights, refresh held ones.

A slot table `<int32>[De, h + r]` names the expert each slot of each device on the mesh's
`expert` axis holds (see `moe_jax.placement`); its r replica columns are what these functions fill:

  table = place(load, cfg, num_replica_slots=2, mesh=mesh)      # <int32>[De, h + 2]
  replicas = prefetch(params, table, cfg, mesh=mesh)            # {name: <f>[De * 2, ...]}
  y, stats = moe_apply(params, x, cfg, mesh=mesh, slot_table=table, replica_weights=replicas)

`prefetch` reads only the table and the home weights, so it can be issued as soon as the table is
known (one MoE layer early) and overlap the current layer. `refresh` reuses replicas already held
for an older table and fetches only the slots whose expert changed.

Replica weights are laid out `[De * r, ...]`, sharded over 'expert' (each device holds its r).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import collectives
from moe_jax import mesh as mesh_lib
from moe_jax import placement
from moe_jax.config import ExecutionConfig, MoEConfig

EXPERT_WEIGHT_NAMES = ("wi", "wo", "wi_gate")


def expert_weights(params: dict) -> dict:
  """The layer params' stacked expert weights {name: <f>[E, ...]} (no router)."""
  return {k: params[k] for k in EXPERT_WEIGHT_NAMES if k in params}


def exchange_mode(execution: ExecutionConfig) -> str:
  """The collective an exchange really uses: "ragged", "padded" or "emulated_ragged"."""
  if execution.all_to_all != "auto":
    return execution.all_to_all
  return "padded" if jax.default_backend() == "cpu" else "ragged"


def place(load: jax.Array, cfg: MoEConfig, *, num_replica_slots: int, mesh,
          previous_table=None, stickiness: float = 0.0) -> jax.Array:
  """Slot table <int32>[De, h + r] balancing the per-expert `load` <f32>[E] over the mesh.

  Computed whole on every device (`mesh.on_every_device`), so inside a jitted step it costs no
  collective beyond what makes `load` replicated. `previous_table` and `stickiness` keep the held
  table unless a new one lowers the expected max device load by more than that fraction.
  """
  if not isinstance(num_replica_slots, int) or num_replica_slots < 0:
    raise ValueError(f"num_replica_slots must be an int >= 0, got {num_replica_slots!r}.")
  num_devices = check_experts_fit(cfg, mesh)
  run = lambda load, previous: placement.place(load, num_devices, num_replica_slots,
                                               previous_table=previous, stickiness=stickiness)
  if previous_table is None:
    return mesh_lib.on_every_device(lambda load: run(load, None), mesh)(load)
  return mesh_lib.on_every_device(run, mesh)(load, jnp.asarray(previous_table, jnp.int32))


def prefetch(params: dict, slot_table: jax.Array, cfg: MoEConfig, *, mesh,
             execution: ExecutionConfig | None = None) -> dict:
  """Replica weights {name: <f>[De * r, ...]} (sharded over 'expert') for `slot_table`.

  Call it as soon as the table is known (e.g. one layer early) and pass the result to `moe_apply`
  as `replica_weights`; it reads only the table and the home weights.
  """
  num_devices = check_experts_fit(cfg, mesh)
  placement.validate_slot_table(slot_table, cfg.num_experts, num_devices)
  return _prefetch_jit(expert_weights(params), jnp.asarray(slot_table, jnp.int32),
                       mode=exchange_mode(execution or ExecutionConfig()), mesh=mesh)


@functools.partial(jax.jit, static_argnames=("mode", "mesh"))
def _prefetch_jit(home, slot_table, *, mode, mesh):
  def body(home, table):
    return collectives.prefetch_replicas(home, table, mode=mode)

  specs = {k: P("expert") for k in home}
  return jax.shard_map(body, mesh=mesh, in_specs=(specs, P()), out_specs=specs)(home, slot_table)


def refresh(params: dict, slot_table: jax.Array, held_table: jax.Array, held_weights: dict,
            cfg: MoEConfig, *, mesh,
            execution: ExecutionConfig | None = None) -> tuple[dict, jax.Array]:
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
  mode = exchange_mode(execution or ExecutionConfig())

  def diff(slot_table, held_table):
    changed = slot_table[:, h:] != held_table[:, h:]                           # [De, r]
    fetch = slot_table.at[:, h:].set(jnp.where(changed, slot_table[:, h:], -1))
    return changed, fetch, jnp.any(changed, axis=0)

  changed, fetch_table, column_changed = mesh_lib.on_every_device(diff, mesh)(
      jnp.asarray(slot_table, jnp.int32), jnp.asarray(held_table, jnp.int32))
  home = expert_weights(params)
  fetched_bytes = replica_bytes(fetch_table, params, h) * num_data
  if mode != "padded":
    return _merge_columns(held_weights, _prefetch_jit(home, fetch_table, mode=mode, mesh=mesh),
                          changed, 0, mesh=mesh), fetched_bytes
  weights = dict(held_weights)
  for c in range(changed.shape[1]):
    def fetch_column(weights, c=c):
      column_table = jnp.concatenate([fetch_table[:, :h], fetch_table[:, h + c:h + c + 1]], 1)
      fetched = _prefetch_jit(home, column_table, mode=mode, mesh=mesh)      # {k: [De, ...]}
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


def empty_replicas(params: dict, num_replica_slots: int, *, mesh) -> dict:
  """{name: zeros <f>[De * r, ...]} sharded over 'expert': the replicas of the home-only table."""
  _, num_devices = mesh_lib.axis_sizes(mesh)
  sharding = jax.sharding.NamedSharding(mesh, P("expert"))
  shapes = {k: ((num_devices * num_replica_slots,) + w.shape[1:], w.dtype)
            for k, w in expert_weights(params).items()}
  make = jax.jit(lambda: {k: jnp.zeros(s, d) for k, (s, d) in shapes.items()},
                 out_shardings={k: sharding for k in shapes})
  return make()


def replica_bytes(slot_table: jax.Array, params: dict, num_home: int) -> jax.Array:
  """<f32>[] expert-weight bytes one expert-axis group copies to fill the table's replica slots."""
  per_expert = sum(math.prod(w.shape[1:]) * w.dtype.itemsize
                   for w in expert_weights(params).values())
  return jnp.sum(slot_table[:, num_home:] >= 0).astype(jnp.float32) * float(per_expert)


def check_experts_fit(cfg: MoEConfig, mesh) -> int:
  """De, the mesh's expert-axis size; ValueError unless it divides num_experts."""
  _, num_devices = mesh_lib.axis_sizes(mesh)
  if cfg.num_experts % num_devices:
    raise ValueError(
        f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis "
        f"({num_devices}); choose an expert axis that divides {cfg.num_experts}.")
  return num_devices


def check_replica_weights(replica_weights: dict, params: dict, slot_table) -> None:
  """ValueError unless `replica_weights` has the [De * r, ...] shapes `slot_table` implies."""
  num_devices = slot_table.shape[0]
  home = expert_weights(params)
  num_replica_slots = slot_table.shape[1] - next(iter(home.values())).shape[0] // num_devices
  for name, w in home.items():
    expected = (num_devices * num_replica_slots,) + tuple(w.shape[1:])
    got = tuple(replica_weights[name].shape) if name in replica_weights else None
    if got != expected:
      raise ValueError(f"replica_weights[{name!r}] has shape {got}, expected {expected}; "
                       "compute them with moe_jax.prefetch(params, slot_table, cfg, mesh=mesh).")
