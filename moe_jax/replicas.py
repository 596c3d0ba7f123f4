"""The replica API of one MoE layer: place replicas, fetch their weights, refresh held ones.

Each device on the mesh's `expert` axis has h = E / De home slots, fixed (device d holds experts
d * h .. d * h + h - 1), and r replica slots. Placement chooses only the replica columns
`<int32>[De, r]` (the expert each replica slot holds, -1 empty), and a `Replicas` value carries
those columns together with the weights fetched for them, so a layer can never be handed weights
fetched for one placement and a table for another, nor a table with other home columns:

  columns = place(load, cfg, num_replica_slots=2, mesh=mesh)     # <int32>[De, 2]
  replicas = prefetch(params, columns, cfg, mesh=mesh)           # Replicas
  y, stats = moe_apply(params, x, cfg, mesh=mesh, replicas=replicas)
  replicas.slot_table                                            # <int32>[De, h + 2], for reports

`prefetch` reads only the columns and the home weights, so it can be issued as soon as the columns
are known (one MoE layer early) and overlap the current layer. `refresh` reuses replicas already
held and fetches only the slots whose expert changed.

Invalid columns (an id outside [-1, E), or an expert twice on one device) are a ValueError when
concrete; under jit they cannot be checked on the host, and the layer's output is NaN instead.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from moe_jax import collectives
from moe_jax import mesh as mesh_lib
from moe_jax import placement
from moe_jax.config import ExecutionConfig, MoEConfig

EXPERT_WEIGHT_NAMES = ("wi", "wo", "wi_gate")


@struct.dataclass
class Replicas:
  """One MoE layer's replica slots: the expert each holds and its weights, as one value.

  Made by `prefetch`, `refresh` and `empty_replicas`, which fetch the weights for exactly these
  columns (building one by hand, or `.replace`-ing its columns, breaks that pairing).

  Attributes:
    columns: <int32>[De, r] expert held by replica slot c of device d (-1: empty).
    weights: {name: <f>[De * r, ...]} their weights, sharded over 'expert' (device d holds rows
      d * r .. d * r + r - 1); zeros in empty slots.
    num_experts: E (static).
  """

  columns: jax.Array
  weights: dict
  num_experts: int = struct.field(pytree_node=False)

  @property
  def num_replica_slots(self) -> int:
    return self.columns.shape[1]

  @property
  def slot_table(self) -> jax.Array:
    """<int32>[De, h + r] the fixed home columns, then the replica columns."""
    return placement.with_home(self.columns, self.num_experts)


def expert_weights(params: dict) -> dict:
  """The layer params' stacked expert weights {name: <f>[E, ...]} (no router)."""
  return {k: params[k] for k in EXPERT_WEIGHT_NAMES if k in params}


def exchange_mode(execution: ExecutionConfig) -> str:
  """The collective an exchange really uses: "ragged", "padded" or "emulated_ragged"."""
  if execution.all_to_all != "auto":
    return execution.all_to_all
  return "padded" if jax.default_backend() == "cpu" else "ragged"


def place(load: jax.Array, cfg: MoEConfig, *, num_replica_slots: int, mesh,
          previous: Replicas | jax.Array | None = None, stickiness: float = 0.0) -> jax.Array:
  """Replica columns <int32>[De, r] balancing the per-expert `load` <f32>[E] over the mesh.

  Computed whole on every device (`mesh.on_every_device`), so inside a jitted step it costs no
  collective beyond what makes `load` replicated. `previous` (the held `Replicas`, or their
  columns) and `stickiness` keep the held columns unless new ones lower the expected max device
  load by more than that fraction.
  """
  if not isinstance(num_replica_slots, int) or num_replica_slots < 0:
    raise ValueError(f"num_replica_slots must be an int >= 0, got {num_replica_slots!r}.")
  num_devices = check_experts_fit(cfg, mesh)
  e, h = cfg.num_experts, cfg.num_experts // num_devices

  def run(load, previous):
    previous = None if previous is None else placement.with_home(previous, e)
    return placement.place(load, num_devices, num_replica_slots, previous_table=previous,
                           stickiness=stickiness)[:, h:]

  if previous is None:
    return mesh_lib.on_every_device(lambda load: run(load, None), mesh)(load)
  previous = previous.columns if isinstance(previous, Replicas) else previous
  placement.validate_replica_columns(previous, e, num_devices, num_replica_slots)
  return mesh_lib.on_every_device(run, mesh)(load, jnp.asarray(previous, jnp.int32))


def replica_columns(slot_table, cfg: MoEConfig, *, mesh) -> jax.Array:
  """The replica columns <int32>[De, r] of a full, concrete slot table <int32>[De, h + r].

  ValueError if the table is invalid (its home columns differ from the fixed ones, an id is out
  of range, an expert is twice on a device) or traced: inside jit a table's home columns cannot
  be checked, so pass replica columns there (what `place` returns).
  """
  num_devices = check_experts_fit(cfg, mesh)
  if isinstance(slot_table, jax.core.Tracer):
    raise ValueError("replica_columns needs a concrete slot table: inside jit its home columns "
                     "cannot be checked; pass the replica columns <int32>[De, r] (what "
                     "moe_jax.place returns) instead of a full table.")
  placement.validate_slot_table(slot_table, cfg.num_experts, num_devices)
  return jnp.asarray(slot_table, jnp.int32)[:, cfg.num_experts // num_devices:]


def prefetch(params: dict, columns: jax.Array, cfg: MoEConfig, *, mesh,
             execution: ExecutionConfig | None = None) -> Replicas:
  """`Replicas` for `columns` <int32>[De, r]: their weights (sharded over 'expert') fetched from
  the home experts.

  Call it as soon as the columns are known (e.g. one layer early) and pass the result to
  `moe_apply(..., replicas=...)`; it reads only the columns and the home weights.
  """
  num_devices = check_experts_fit(cfg, mesh)
  placement.validate_replica_columns(columns, cfg.num_experts, num_devices)
  columns = jnp.asarray(columns, jnp.int32)
  weights = _prefetch_jit(expert_weights(params), columns,
                          mode=exchange_mode(execution or ExecutionConfig()), mesh=mesh)
  return Replicas(columns=columns, weights=weights, num_experts=cfg.num_experts)


@functools.partial(jax.jit, static_argnames=("mode", "mesh"))
def _prefetch_jit(home, columns, *, mode, mesh):
  def body(home, columns):
    return collectives.prefetch_replicas(home, columns, mode=mode)

  specs = {k: P("expert") for k in home}
  return jax.shard_map(body, mesh=mesh, in_specs=(specs, P()), out_specs=specs)(home, columns)


def refresh(params: dict, new: jax.Array, held: Replicas, cfg: MoEConfig, *, mesh,
            execution: ExecutionConfig | None = None) -> tuple[Replicas, jax.Array]:
  """`Replicas` for the columns `new`, reusing the replica weights `held` already has.

  Only replica slots whose expert changed are fetched: with the ragged exchange (GPU/TPU) the
  others move no bytes; on the padded CPU fallback each replica column is exchanged on its own,
  under a `lax.cond` that skips it when no device's slot in that column changed (the predicate
  comes from the replicated columns, so every device agrees), so a refresh of one slot moves one
  column of cells instead of all r.
  `held` must come from `prefetch`/`refresh`/`empty_replicas` with these same `params`: resident
  replicas are copies, so start again from `empty_replicas` when params change.

  Args:
    params: the layer's params (home experts sharded over 'expert').
    new: <int32>[De, r] the new replica columns (r as in `held`).
    held: the replicas held now.

  Returns:
    (`Replicas` of `new`, <f32>[] expert-weight bytes fetched into replica slots on the whole mesh).
  """
  num_data, num_devices = mesh_lib.axis_sizes(mesh)
  check_replicas(held, params, cfg, num_devices)
  placement.validate_replica_columns(new, cfg.num_experts, num_devices, held.num_replica_slots)
  new = jnp.asarray(new, jnp.int32)
  mode = exchange_mode(execution or ExecutionConfig())

  def diff(new, old):
    changed = new != old                                                      # [De, r]
    return changed, jnp.where(changed, new, -1), jnp.any(changed, axis=0)

  changed, fetch, column_changed = mesh_lib.on_every_device(diff, mesh)(new, held.columns)
  home = expert_weights(params)
  fetched_bytes = replica_bytes(fetch, params) * num_data
  if mode != "padded":
    weights = _merge_columns(held.weights, _prefetch_jit(home, fetch, mode=mode, mesh=mesh),
                             changed, 0, mesh=mesh)
    return Replicas(columns=new, weights=weights, num_experts=cfg.num_experts), fetched_bytes
  weights = dict(held.weights)
  for c in range(changed.shape[1]):
    def fetch_column(weights, c=c):
      fetched = _prefetch_jit(home, fetch[:, c:c + 1], mode=mode, mesh=mesh)   # {k: [De, ...]}
      return _merge_columns(weights, fetched, changed[:, c:c + 1], c, mesh=mesh)
    weights = jax.lax.cond(column_changed[c], fetch_column, lambda weights: weights, weights)
  return Replicas(columns=new, weights=weights, num_experts=cfg.num_experts), fetched_bytes


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


def empty_replicas(params: dict, num_replica_slots: int, *, mesh) -> Replicas:
  """r empty replica slots per device (columns -1, weights zeros sharded over 'expert')."""
  _, num_devices = mesh_lib.axis_sizes(mesh)
  home = expert_weights(params)
  num_experts = next(iter(home.values())).shape[0]
  shapes = {k: ((num_devices * num_replica_slots,) + w.shape[1:], w.dtype)
            for k, w in home.items()}
  make = jax.jit(lambda: (jnp.full((num_devices, num_replica_slots), -1, jnp.int32),
                          {k: jnp.zeros(s, d) for k, (s, d) in shapes.items()}),
                 out_shardings=(jax.sharding.NamedSharding(mesh, P()),
                                {k: jax.sharding.NamedSharding(mesh, P("expert")) for k in shapes}))
  columns, weights = make()
  return Replicas(columns=columns, weights=weights, num_experts=num_experts)


def replica_bytes(columns: jax.Array, params: dict) -> jax.Array:
  """<f32>[] expert-weight bytes one expert-axis group copies to fill replica columns [De, r]."""
  per_expert = sum(math.prod(w.shape[1:]) * w.dtype.itemsize
                   for w in expert_weights(params).values())
  return jnp.sum(columns >= 0).astype(jnp.float32) * float(per_expert)


def check_experts_fit(cfg: MoEConfig, mesh) -> int:
  """De, the mesh's expert-axis size; ValueError unless it divides num_experts."""
  _, num_devices = mesh_lib.axis_sizes(mesh)
  if cfg.num_experts % num_devices:
    raise ValueError(
        f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis "
        f"({num_devices}); choose an expert axis that divides {cfg.num_experts}.")
  return num_devices


def check_replicas(replicas: Replicas, params: dict, cfg: MoEConfig, num_devices: int) -> None:
  """ValueError unless `replicas` is a `Replicas` for this layer: E, De rows, [De * r, ...]
  weights of the params' expert shapes, and (when concrete) valid columns."""
  if not isinstance(replicas, Replicas):
    raise ValueError(f"replicas must be a moe_jax.Replicas (from moe_jax.prefetch, refresh or "
                     f"empty_replicas), got {type(replicas).__name__}.")
  if replicas.num_experts != cfg.num_experts:
    raise ValueError(f"replicas are for num_experts={replicas.num_experts}, but the layer has "
                     f"{cfg.num_experts}; fetch them with this layer's params and MoEConfig.")
  placement.validate_replica_columns(replicas.columns, cfg.num_experts, num_devices)
  num_replica_slots = replicas.columns.shape[1]
  for name, w in expert_weights(params).items():
    expected = (num_devices * num_replica_slots,) + tuple(w.shape[1:])
    got = replicas.weights.get(name)
    got = None if got is None else tuple(got.shape)
    if got != expected:
      raise ValueError(f"replicas.weights[{name!r}] has shape {got}, expected {expected} for "
                       f"{num_replica_slots} replica slots on {num_devices} devices; fetch them "
                       "with moe_jax.prefetch(params, columns, cfg, mesh=mesh).")
