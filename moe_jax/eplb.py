"""DeepSeek's expert-parallel load balancer (EPLB) as a replica placement, adapted to home slots.

EPLB, as DeepSeek describes it, turns historical per-expert loads into physical expert copies:
  1. Replication: every expert starts with one copy; each redundant slot in turn gives one more
     copy to the expert with the highest load per copy (its load split evenly over its copies).
  2. Packing: the physical copies, heaviest first, each go to the least-loaded device that still
     has room; every device gets the same number of slots. The objective is the max device load.
  3. Hierarchical (when the cluster has a node level): first pack groups of experts onto nodes,
     balancing node loads; then replicate within each node (copies never leave their node); then
     pack each node's copies onto its devices.

Our layout fixes what EPLB is free to choose: device d always holds experts d*h .. d*h + h - 1 in
its h home slots, and only the De * r replica slots are placed. The adaptation, exactly:
  * Step 1 counts the home copy as each expert's first copy and hands out the De * r replica
    slots (G * r per node when hierarchical), capping an expert at one copy per device (De copies,
    or G within a node); an expert with zero load gets no copy (its slot would balance nothing
    and cost a weight fetch), so slots are left empty (-1) once every remaining load is zero.
  * Step 2 pre-packs the home copies (device d starts with the per-copy loads of its own experts)
    and packs only the replica copies, heaviest first (ties: lower expert id), each onto the
    least-loaded device (ties: lower index) with a free replica slot that does not already hold
    that expert. A copy with no such device is dropped (its slot may take a later, lighter copy).
  * Because homes are pinned, the packed result can be worse than no replicas at all (a hot
    expert's copy forced onto a device that is already heavy); then the node keeps no replicas:
    its max device load, with each expert's load split over the copies actually placed, never
    exceeds the home-only one.
  * Hierarchical: the expert groups are the nodes' home experts (node n = devices n*G ..
    n*G + G - 1 homes experts n*G*h .. (n+1)*G*h - 1), so step "groups onto nodes" is fixed by the
    home layout and node loads are not rebalanced; steps 1-2 then run inside each node (vmapped),
    so every replica is fetched from, and dispatched within, its own node (G = 1 leaves every
    replica slot empty; G = De is the flat variant).

Step 1 picks copy counts blind to where homes sit, which the greedy `placement.place` does not:
on the tiny cases of benchmarks/placement_gap.py (30 Zipf(1.2) trials each) flat EPLB's max
device load is 1.5-18 % above the exhaustive optimum on average (worst 46 %), the greedy's
0.5-4 % (worst 17 %). Hierarchical EPLB averages within 1 % (worst 10 %) of the best placement
that keeps replicas on their node, but 31-38 % above the unrestricted optimum on average (node
loads stay as the homes make them).

`eplb_columns` is jit-able (fixed shapes: fori_loops, a sort) and returns replica columns
<int32>[De, r] (-1 = empty), the same contract as `placement.place(...)[:, h:]`; `place` is the
mesh-level form of `moe_jax.replicas.place`. `reference.eplb_columns` is the slow oracle, and
tests/test_eplb.py / benchmarks/placement_gap.py compare both with the exhaustive optimum.

Driving it from recorded counts (`moe_jax.expert_counts`):

  counts = expert_counts.load("trace.json", num_experts=cfg.num_experts)   # {stack: [n, E]}
  columns = eplb.place(counts["decoder"][layer], cfg, num_replica_slots=2, mesh=mesh)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import mesh as mesh_lib
from moe_jax import placement
from moe_jax import replicas
from moe_jax.config import MoEConfig


def eplb_columns(load, num_devices: int, num_replica_slots: int, *,
                 devices_per_node: int | None = None) -> jax.Array:
  """EPLB replica columns <int32>[De, r] for per-expert `load` <f32>[E] (module docstring).

  Args:
    load: <f32>[E] per-expert load (historical counts; any non-negative scale). Checked when
      concrete; under jit, negative or non-finite entries count as zero.
    num_devices: De, devices on the `expert` axis (must divide E).
    num_replica_slots: r, replica slots per device.
    devices_per_node: G, devices per node for the hierarchical variant (must divide De);
      None: flat (one node of De devices).

  Returns:
    <int32>[De, r] expert held by each replica slot (-1: empty); passes
    `placement.validate_replica_columns`.
  """
  num_experts = _check_args(load, num_devices, num_replica_slots, devices_per_node)
  load = jnp.asarray(load, jnp.float32)
  load = jnp.where(jnp.isfinite(load) & (load > 0), load, 0.0)
  per_node = num_devices if devices_per_node is None else devices_per_node
  num_nodes = num_devices // per_node
  if num_replica_slots == 0:
    return jnp.full((num_devices, 0), -1, jnp.int32)
  node_load = load.reshape(num_nodes, num_experts // num_nodes)             # [N, G*h]
  local = jax.vmap(lambda l: _node_columns(l, per_node, num_replica_slots))(node_load)  # [N, G, r]
  offset = (jnp.arange(num_nodes, dtype=jnp.int32) * (num_experts // num_nodes))[:, None, None]
  return jnp.where(local >= 0, local + offset, -1).reshape(num_devices, num_replica_slots)


def _node_columns(load: jax.Array, num_devices: int, num_replica_slots: int) -> jax.Array:
  """<int32>[G, r] replica columns of one node (local expert ids) for its loads <f32>[m]."""
  copies = _replicate(load, num_devices, num_replica_slots)                 # [m]
  columns = _pack(load, copies, num_devices, num_replica_slots)             # [G, r]
  table = placement.with_home(columns, load.shape[0])                       # [G, h + r]
  home_max = jnp.max(jnp.sum(load.reshape(num_devices, -1), axis=1))
  packed_max = jnp.max(placement.device_load(load, table))
  # A relative tolerance: equal maxima may round differently in the two sums.
  return jnp.where(packed_max <= home_max * (1 + 1e-6), columns, -1)


def _replicate(load: jax.Array, num_devices: int, num_replica_slots: int) -> jax.Array:
  """<int32>[m] copies per expert (home included): step 1, one slot at a time."""
  def step(_, copies):
    per_copy = load / copies
    eligible = (copies < num_devices) & (load > 0)
    expert = jnp.argmax(jnp.where(eligible, per_copy, -1.0))
    return jnp.where(eligible[expert], copies.at[expert].add(1), copies)

  ones = jnp.ones(load.shape, jnp.int32)
  return jax.lax.fori_loop(0, num_devices * num_replica_slots, step, ones)


def _pack(load: jax.Array, copies: jax.Array, num_devices: int,
          num_replica_slots: int) -> jax.Array:
  """<int32>[G, r] step 2: the replica copies, heaviest first, onto the least-loaded device
  with a free replica slot that lacks the expert (home copies pre-packed)."""
  num_experts = load.shape[0]
  h = num_experts // num_devices
  num_items = num_devices * num_replica_slots
  per_copy = load / copies                                                  # [m]
  order = jnp.argsort(-per_copy, stable=True)                               # heaviest first
  ends = jnp.cumsum((copies - 1)[order])                                    # [m]
  item = jnp.arange(num_items)
  item_expert = order[jnp.minimum(jnp.searchsorted(ends, item, side="right"), num_experts - 1)]
  item_valid = item < ends[-1]                                              # [G*r]
  holds = jnp.arange(num_devices)[:, None] == (jnp.arange(num_experts) // h)[None, :]  # [G, m]
  dev_load = jnp.sum(per_copy.reshape(num_devices, h), axis=1)              # [G] home copies

  def step(i, state):
    columns, holds, filled, dev_load = state
    expert = item_expert[i]
    eligible = (filled < num_replica_slots) & ~holds[:, expert]             # [G]
    ok = item_valid[i] & jnp.any(eligible)
    device = jnp.argmin(jnp.where(eligible, dev_load, jnp.inf))
    column = jnp.minimum(filled[device], num_replica_slots - 1)
    columns = jnp.where(ok, columns.at[device, column].set(expert), columns)
    holds = jnp.where(ok, holds.at[device, expert].set(True), holds)
    filled = jnp.where(ok, filled.at[device].add(1), filled)
    dev_load = jnp.where(ok, dev_load.at[device].add(per_copy[expert]), dev_load)
    return columns, holds, filled, dev_load

  columns = jnp.full((num_devices, num_replica_slots), -1, jnp.int32)
  state = (columns, holds, jnp.zeros((num_devices,), jnp.int32), dev_load)
  return jax.lax.fori_loop(0, num_items, step, state)[0].astype(jnp.int32)


def place(load, cfg: MoEConfig, *, num_replica_slots: int, mesh,
          devices_per_node: int | None = None) -> jax.Array:
  """EPLB replica columns <int32>[De, r] for `load` <f32>[E] over the mesh's expert axis.

  The EPLB counterpart of `moe_jax.replicas.place`: computed whole on every device
  (`mesh.on_every_device`), so inside a jitted step it adds no collective. `devices_per_node`
  (dividing the expert axis) selects the hierarchical variant.
  """
  num_devices = replicas.check_experts_fit(cfg, mesh)
  if np.shape(load) != (cfg.num_experts,):
    raise ValueError(f"load has shape {np.shape(load)}, expected ({cfg.num_experts},) = "
                     "(num_experts,): one load per expert of this layer.")
  _check_args(load, num_devices, num_replica_slots, devices_per_node)
  return _place_jit(jnp.asarray(load, jnp.float32), num_replica_slots=num_replica_slots,
                    devices_per_node=devices_per_node, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("num_replica_slots", "devices_per_node", "mesh"))
def _place_jit(load, *, num_replica_slots, devices_per_node, mesh):
  """Jitted so an eager call compiles once per shape (inside a jitted step it is inlined)."""
  num_devices = mesh_lib.axis_sizes(mesh)[1]

  def run(load):
    return eplb_columns(load, num_devices, num_replica_slots, devices_per_node=devices_per_node)

  return mesh_lib.on_every_device(run, mesh)(load)


def _check_args(load, num_devices, num_replica_slots, devices_per_node) -> int:
  """E after checking the arguments (ValueError naming the fix)."""
  for name, value, low in (("num_devices", num_devices, 1),
                           ("num_replica_slots", num_replica_slots, 0)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
  shape = np.shape(load)
  if len(shape) != 1 or shape[0] % num_devices:
    raise ValueError(f"load has shape {shape}; expected [E] with E divisible by num_devices="
                     f"{num_devices} (one load per expert, h = E / De home slots per device).")
  if devices_per_node is not None and (
      not isinstance(devices_per_node, (int, np.integer)) or devices_per_node < 1
      or num_devices % devices_per_node):
    raise ValueError(f"devices_per_node={devices_per_node!r} must be a positive int dividing the "
                     f"expert axis ({num_devices} devices), or None for flat EPLB.")
  # Values are checked only where this process can read them all (not traced, not spread over
  # other processes' devices).
  if not isinstance(load, jax.core.Tracer) and getattr(load, "is_fully_addressable", True):
    values = np.asarray(load, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
      bad = int(np.flatnonzero(~np.isfinite(values) | (values < 0))[0])
      raise ValueError(f"load[{bad}] = {values[bad]}: loads must be finite and >= 0 "
                       "(token counts per expert, or any non-negative scale).")
  return shape[0]
