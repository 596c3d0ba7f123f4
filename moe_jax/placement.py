"""Slot tables and replica placement.

Each of the D devices on the `expert` mesh axis has `h = E / D` home slots and `r` replica slots.
A slot table `<int32>[D, h + r]` names the expert whose weights each slot holds (-1 = empty).
Home columns are fixed (device `dev`, column `c < h` holds expert `dev * h + c`); placement only
rewrites the replica columns `<int32>[D, r]` (the table's last r columns), and the replica API
(`moe_jax.replicas`) takes only those: `with_home` rebuilds the table. Slot `(dev, c)` has the
global slot id `dev * (h + r) + c`.

`place` is jit-able with fixed shapes: a load estimate goes in, a slot table comes out.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def home_slot_table(num_experts: int, num_devices: int, num_replica_slots: int = 0) -> jax.Array:
  """<int32>[D, h + r] the table with only home slots filled."""
  experts_per_device = num_experts // num_devices
  home = jnp.arange(num_experts, dtype=jnp.int32).reshape(num_devices, experts_per_device)
  empty = jnp.full((num_devices, num_replica_slots), -1, jnp.int32)
  return jnp.concatenate([home, empty], axis=1)


def with_home(columns: jax.Array, num_experts: int) -> jax.Array:
  """<int32>[D, h + r] the slot table whose replica columns are `columns` <int32>[D, r]."""
  num_devices = columns.shape[0]
  home = home_slot_table(num_experts, num_devices)
  return jnp.concatenate([home, jnp.asarray(columns, jnp.int32)], axis=1)


def columns_valid(columns: jax.Array, num_experts: int) -> jax.Array:
  """<bool>[] whether replica columns <int32>[D, r] are valid, computed on device (jit-able).

  Valid: every entry is -1 or an expert id in [0, E), and no device holds an expert twice
  (counting its home slots). `validate_replica_columns` says what is wrong on the host.
  """
  table = with_home(columns, num_experts)                                  # [D, S]
  in_range = jnp.all((table >= -1) & (table < num_experts))
  same = (table[:, :, None] == table[:, None, :]) & (table[:, :, None] >= 0)   # [D, S, S]
  same = same & ~jnp.eye(table.shape[1], dtype=bool)[None]
  return in_range & ~jnp.any(same)


def validate_replica_columns(columns, num_experts: int, num_devices: int,
                             num_replica_slots: int | None = None) -> None:
  """Raises ValueError naming the problem if `columns` are not valid replica columns <int32>[D, r].

  The shape is always checked; the values only when `columns` is concrete (inside jit, the layer
  turns invalid columns into NaN outputs instead: see `columns_valid`).
  """
  shape = tuple(np.shape(columns))
  h = num_experts // num_devices
  if len(shape) != 2 or shape[0] != num_devices or (
      num_replica_slots is not None and shape[1] != num_replica_slots):
    r = "r" if num_replica_slots is None else str(num_replica_slots)
    raise ValueError(
        f"replica columns have shape {shape}, expected ({num_devices}, {r}) = (expert-axis "
        "devices, replica slots per device); moe_jax.place returns them, and "
        "moe_jax.replica_columns(slot_table, cfg, mesh=mesh) takes them from a full slot table.")
  if isinstance(columns, jax.core.Tracer):
    return
  cols = np.asarray(columns)
  if not np.issubdtype(cols.dtype, np.integer):
    raise ValueError(f"replica columns must hold integers, got dtype {cols.dtype}.")
  bad = (cols < -1) | (cols >= num_experts)
  if bad.any():
    dev, col = np.argwhere(bad)[0]
    raise ValueError(f"replica column [{dev}, {col}] = {cols[dev, col]} is out of range: entries "
                     f"must be -1 (empty) or an expert id in [0, {num_experts}).")
  home = np.arange(num_experts).reshape(num_devices, h)
  for dev in range(num_devices):
    seen = set(home[dev].tolist())
    for col, expert in enumerate(cols[dev].tolist()):
      if expert >= 0 and expert in seen:
        where = "in a home slot" if expert in home[dev] else "in another replica slot"
        hint = ""
        if shape[1] >= h and np.array_equal(cols[:, :h], home):
          hint = (" (this looks like a full slot table: pass its replica columns, "
                  "moe_jax.replica_columns(slot_table, cfg, mesh=mesh))")
        raise ValueError(f"replica column [{dev}, {col}] holds expert {expert}, which device {dev} "
                         f"already holds {where}; an expert may appear at most once per "
                         f"device{hint}.")
      seen.add(expert)


def num_replica_slots(slot_table, num_experts: int) -> int:
  """r of a slot table <int32>[D, h + r] (static: read from its shape)."""
  num_devices, width = np.shape(slot_table)
  return width - num_experts // num_devices


def validate_slot_table(slot_table, num_experts: int, num_devices: int,
                        num_replica_slots: int | None = None) -> None:
  """Raises ValueError naming the problem if `slot_table` is not a valid table.

  `num_replica_slots` None accepts any r >= 0 (the table's width decides). The shape is always
  checked; the values only when the table is concrete (the replica API takes a full table only
  concrete: `replicas.replica_columns`).
  """
  shape = tuple(np.shape(slot_table))
  h = num_experts // num_devices
  r = num_replica_slots if num_replica_slots is not None else (
      shape[1] - h if len(shape) == 2 else 0)
  expected = (num_devices, h + max(r, 0))
  if shape != expected or r < 0:
    slots = "" if num_replica_slots is None else f" + {num_replica_slots} replica"
    raise ValueError(
        f"slot_table has shape {shape}, expected {expected} = (expert-axis devices, "
        f"{h} home{slots} slots); build one with moe_jax.home_slot_table or moe_jax.place.")
  if isinstance(slot_table, jax.core.Tracer):
    return
  table = np.asarray(slot_table)
  if not np.issubdtype(table.dtype, np.integer):
    raise ValueError(f"slot_table must hold integers, got dtype {table.dtype}.")
  bad = (table < -1) | (table >= num_experts)
  if bad.any():
    dev, col = np.argwhere(bad)[0]
    raise ValueError(f"slot_table[{dev}, {col}] = {table[dev, col]} is out of range: entries must "
                     f"be -1 (empty) or an expert id in [0, {num_experts}).")
  home = np.arange(num_experts).reshape(num_devices, h)
  if not np.array_equal(table[:, :h], home):
    dev, col = np.argwhere(table[:, :h] != home)[0]
    raise ValueError(f"slot_table home column changed: slot [{dev}, {col}] holds expert "
                     f"{table[dev, col]} but home slots are fixed to expert {home[dev, col]}.")
  for dev in range(num_devices):
    held = table[dev][table[dev] >= 0]
    values, counts = np.unique(held, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"slot_table row {dev} holds expert {values[counts > 1][0]} more than once; "
                       "an expert may appear at most once per device.")


def copies_per_expert(slot_table: jax.Array, num_experts: int) -> jax.Array:
  """<int32>[E] how many slots hold each expert (>= 1: the home slot)."""
  flat = slot_table.reshape(-1)
  return jnp.zeros((num_experts,), jnp.int32).at[jnp.where(flat >= 0, flat, num_experts)].add(
      1, mode="drop")


def copy_slots(slot_table: jax.Array, num_experts: int) -> jax.Array:
  """<int32>[E, D] global slot ids holding each expert, ascending, padded with -1.

  An expert is at most once per device, so it has at most D copies.
  """
  num_devices, slots_per_device = slot_table.shape
  flat = slot_table.reshape(-1)
  key = jnp.where(flat >= 0, flat, num_experts)
  order = jnp.argsort(key, stable=True)               # global slots grouped by expert, ascending
  sorted_key = key[order]
  first = jnp.searchsorted(sorted_key, jnp.arange(num_experts), side="left")
  copies = copies_per_expert(slot_table, num_experts)
  j = jnp.arange(num_devices)
  index = jnp.clip(first[:, None] + j[None, :], 0, flat.shape[0] - 1)
  return jnp.where(j[None, :] < copies[:, None], order[index], -1).astype(jnp.int32)


def device_load(load: jax.Array, slot_table: jax.Array) -> jax.Array:
  """<f32>[D] expected load per device when each expert's load is split evenly over its copies."""
  num_experts = load.shape[0]
  per_copy = load / jnp.maximum(copies_per_expert(slot_table, num_experts), 1)
  held = jnp.where(slot_table >= 0, per_copy[jnp.clip(slot_table, 0)], 0.0)
  return jnp.sum(held, axis=1)


def place(load: jax.Array, num_devices: int, num_replica_slots: int, *,
          previous_table: jax.Array | None = None, stickiness: float = 0.0) -> jax.Array:
  """Greedy replica placement minimising the expected max per-device load.

  D * r greedy steps with fixed shapes (it jits and runs on device). Each step scores, for every
  expert e, one more copy of e on the least-loaded device that has a free replica slot and lacks e
  (an expert's load is split evenly over its copies, as the permutation does), and keeps the
  candidate with the lowest resulting max device load, ties broken by the lowest sum of squared
  device loads. A step that would improve neither leaves the table as it is. Measured against the
  exhaustive optimum in tests/test_placement.py and benchmarks/placement_gap.py.

  Args:
    load: <f32>[E] per-expert load estimate (any non-negative scale).
    num_devices: D, size of the `expert` mesh axis.
    num_replica_slots: r.
    previous_table: optional <int32>[D, h + r]; with `stickiness` > 0 it is kept unless the new
      table lowers the expected max device load by more than that fraction (saves weight traffic).
    stickiness: relative gain required to move away from `previous_table`.

  Returns:
    <int32>[D, h + r] slot table.
  """
  load = jnp.asarray(load, jnp.float32)
  num_experts = load.shape[0]
  table = home_slot_table(num_experts, num_devices, num_replica_slots)
  if num_replica_slots == 0:
    return table
  h = num_experts // num_devices
  scale = jnp.maximum(jnp.max(load), 1e-30)
  load = load / scale                                        # scale-free tie tolerances below
  holds = jnp.arange(num_devices)[:, None] == (jnp.arange(num_experts) // h)[None, :]  # [D, E]

  def step(_, state):
    table, holds, filled = state
    copies = jnp.sum(holds, axis=0)                                          # [E]
    dev_load = holds.astype(jnp.float32) @ (load / copies)                   # [D]
    can_take = (filled < num_replica_slots)[:, None] & ~holds                # [D, E]
    target = jnp.argmin(jnp.where(can_take, dev_load[:, None], jnp.inf), axis=0)  # [E]
    possible = jnp.any(can_take, axis=0) & (load > 0)
    # Loads after one more copy of e: its holders shed load, the target gains a copy's share.
    shed = load / copies - load / (copies + 1)                               # [E]
    new_load = dev_load[None, :] - holds.T * shed[:, None]                   # [E, D]
    new_load = new_load + (jnp.arange(num_devices)[None, :] == target[:, None]) * (
        load / (copies + 1))[:, None]
    new_max = jnp.where(possible, jnp.max(new_load, axis=1), jnp.inf)
    new_sq = jnp.sum(new_load ** 2, axis=1)
    best_max = jnp.min(new_max)
    tied = new_max <= best_max + 1e-6
    expert = jnp.argmin(jnp.where(tied, new_sq, jnp.inf))
    improves = (best_max < jnp.max(dev_load) - 1e-6) | (new_sq[expert] < jnp.sum(dev_load ** 2)
                                                         - 1e-6)
    ok = possible[expert] & improves
    device = target[expert]
    column = h + jnp.minimum(filled[device], num_replica_slots - 1)
    table = jnp.where(ok, table.at[device, column].set(expert), table)
    holds = jnp.where(ok, holds.at[device, expert].set(True), holds)
    filled = jnp.where(ok, filled.at[device].add(1), filled)
    return table, holds, filled

  state = (table, holds, jnp.zeros((num_devices,), jnp.int32))
  table = jax.lax.fori_loop(0, num_devices * num_replica_slots, step, state)[0]
  if previous_table is not None and stickiness > 0:
    table = sticky_choice(load, table, previous_table, stickiness)
  return table


def sticky_choice(load: jax.Array, table: jax.Array, previous_table: jax.Array,
                  stickiness: float) -> jax.Array:
  """`table` if it lowers the expected max device load under `load` by more than the fraction
  `stickiness` against `previous_table`, else `previous_table` (whose replicas are already held).
  """
  new_max = jnp.max(device_load(load, table))
  old_max = jnp.max(device_load(load, previous_table))
  return jnp.where(new_max < (1.0 - stickiness) * old_max, table, previous_table)


def balancedness(tokens_per_device) -> jax.Array:
  """mean / max tokens per device (1.0 = perfect balance; 1.0 for an idle layer)."""
  tokens = jnp.asarray(tokens_per_device, jnp.float32).reshape(-1)
  peak = jnp.max(tokens)
  return jnp.where(peak > 0, jnp.mean(tokens) / jnp.maximum(peak, 1e-30), 1.0)


def maxvio(tokens_per_device) -> jax.Array:
  """max / mean - 1 (0.0 = perfect balance)."""
  tokens = jnp.asarray(tokens_per_device, jnp.float32).reshape(-1)
  mean = jnp.mean(tokens)
  return jnp.where(mean > 0, jnp.max(tokens) / jnp.maximum(mean, 1e-30) - 1.0, 0.0)
