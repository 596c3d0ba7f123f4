"""Slow, obvious references the fast paths are tested against.

Nothing here is sharded, sorted or clever: every expert runs over every token and a mask picks the
results; the capacity rule is a Python loop over routing groups. Use only at small shapes.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from moe_jax import experts


def dense_moe(params: dict, tokens, expert_ids, combine_weights, keep, *, activation: str):
  """y[t] = sum_j keep[t, j] * w[t, j] * FFN_{e[t, j]}(x[t]).

  Args:
    params: {"wi": [E, d, f], "wo": [E, f, d]} (+ "wi_gate").
    tokens: <f>[T, d]; expert_ids <int>[T, k]; combine_weights <f32>[T, k]; keep <bool>[T, k].
  Returns:
    <f32>[T, d].
  """
  tokens = jnp.asarray(tokens)
  y = jnp.zeros(tokens.shape, jnp.float32)
  for e in range(params["wi"].shape[0]):
    gate = params["wi_gate"][e] if "wi_gate" in params else None
    y_e = experts.ffn(tokens, params["wi"][e], params["wo"][e], gate, activation).astype(
        jnp.float32)
    weight = jnp.sum(jnp.where((expert_ids == e) & keep, combine_weights, 0.0), axis=1)
    y = y + weight[:, None] * y_e
  return y


def routing_groups(batch: int, length: int, num_data: int, num_devices: int) -> list[np.ndarray]:
  """Token indices (into B * L) of each device's routing group, in the layer's shard layout."""
  per_data = batch * length // num_data
  per_device = -(-per_data // num_devices)
  groups = []
  for d in range(num_data):
    rows = np.arange(d * per_data, (d + 1) * per_data)
    for e in range(num_devices):
      groups.append(rows[e * per_device:(e + 1) * per_device])
  return groups


def capacity_keep(expert_ids, dispatch_mask, groups, *, capacity: int, copies) -> np.ndarray:
  """Which choices survive capacity: within each group, in k-major priority order, the first
  copies[e] * capacity choices of expert e are kept.

  Args:
    expert_ids, dispatch_mask: [T, k] numpy arrays.
    groups: token index arrays, one per routing group.
    capacity: per-slot, per-group rows.
    copies: <int>[E] copies of each expert (1 without replicas).
  """
  expert_ids = np.asarray(expert_ids)
  dispatch_mask = np.asarray(dispatch_mask)
  keep = np.zeros_like(dispatch_mask, dtype=bool)
  for group in groups:
    seen = np.zeros(len(copies), int)
    for j in range(expert_ids.shape[1]):
      for t in group:
        if not dispatch_mask[t, j]:
          continue
        e = expert_ids[t, j]
        keep[t, j] = seen[e] < copies[e] * capacity
        seen[e] += 1
  return keep


def optimal_placement(load, num_devices: int, num_replica_slots: int,
                      devices_per_node: int | None = None):
  """Exhaustive search for the slot table minimising the max expected device load.

  Each expert's load is split evenly over its copies (what the permutation does). Every device
  chooses any set of at most r experts it does not home; all combinations are scored (in numpy
  chunks). Exponential: only for tiny cases (a few devices and experts), to measure how far a
  placement is from the best. `devices_per_node` G restricts a device's replicas to experts homed
  on its node (devices n*G .. n*G + G - 1): the space hierarchical EPLB searches.

  Returns:
    (best max device load, <int32>[D, h + r] table).
  """
  import itertools
  load = np.asarray(load, np.float64)
  num_experts = load.shape[0]
  h = num_experts // num_devices
  per_node = devices_per_node or num_devices
  options = []                                     # per device: <f64>[choices, E] membership
  for dev in range(num_devices):
    others = [e for e in range(num_experts)
              if e // h != dev and e // (h * per_node) == dev // per_node]
    sets = [c for n in range(num_replica_slots + 1) for c in itertools.combinations(others, n)]
    options.append(np.array([np.isin(np.arange(num_experts), c) for c in sets], np.float64))
  home = (np.arange(num_devices)[:, None] == np.arange(num_experts)[None, :] // h).astype(float)
  grid = np.stack(np.meshgrid(*[np.arange(len(o)) for o in options], indexing="ij"), -1)
  grid = grid.reshape(-1, num_devices)                                      # [N, D]
  best, best_row = np.inf, None
  for start in range(0, grid.shape[0], 65536):
    rows = grid[start:start + 65536]
    extra = np.stack([options[d][rows[:, d]] for d in range(num_devices)], 1)  # [n, D, E]
    per_copy = load / (1.0 + extra.sum(1))                                   # [n, E]
    dev_load = (home[None] + extra) @ per_copy[:, :, None]                   # [n, D, 1]
    peak = dev_load[..., 0].max(1)
    if peak.min() < best - 1e-12:
      best, best_row = float(peak.min()), rows[int(np.argmin(peak))]
  table = -np.ones((num_devices, h + num_replica_slots), np.int32)
  table[:, :h] = np.arange(num_experts).reshape(num_devices, h)
  for dev, choice in enumerate(best_row):
    extra = np.flatnonzero(options[dev][choice])
    table[dev, h:h + len(extra)] = extra
  return best, table


def eplb_columns(load, num_devices: int, num_replica_slots: int,
                 devices_per_node: int | None = None) -> np.ndarray:
  """`moe_jax.eplb.eplb_columns` as plain loops (f32 arithmetic, the same tie-breaks).

  Returns:
    <int32>[D, r] replica columns (-1 empty).
  """
  load = np.asarray(load, np.float32)
  load = np.where(np.isfinite(load) & (load > 0), load, np.float32(0))
  num_experts, r = load.shape[0], num_replica_slots
  per_node = devices_per_node or num_devices
  h, m = num_experts // num_devices, num_experts // (num_devices // per_node)
  columns = -np.ones((num_devices, r), np.int32)
  for node in range(num_devices // per_node):
    experts = range(node * m, (node + 1) * m)
    devices = range(node * per_node, (node + 1) * per_node)
    copies = {e: 1 for e in experts}
    for _ in range(per_node * r):                           # 1. replication
      eligible = [e for e in experts if copies[e] < per_node and load[e] > 0]
      if eligible:
        best = max(eligible, key=lambda e: (load[e] / np.float32(copies[e]), -e))
        copies[best] += 1
    per_copy = {e: load[e] / np.float32(copies[e]) for e in experts}
    dev_load = {d: np.float32(sum(per_copy[e] for e in range(d * h, d * h + h))) for d in devices}
    held = {d: set(range(d * h, d * h + h)) for d in devices}
    filled = {d: 0 for d in devices}
    for e in sorted(experts, key=lambda e: (-per_copy[e], e)):  # 2. packing, heaviest first
      for _ in range(copies[e] - 1):
        free = [d for d in devices if filled[d] < r and e not in held[d]]
        if not free:
          continue
        d = min(free, key=lambda d: (dev_load[d], d))
        columns[d, filled[d]] = e
        held[d].add(e)
        filled[d] += 1
        dev_load[d] = np.float32(dev_load[d] + per_copy[e])
    table = np.concatenate([np.arange(num_experts).reshape(num_devices, h), columns], axis=1)
    actual = np.bincount(table[table >= 0], minlength=num_experts)
    placed = [sum(load[e] / actual[e] for e in table[d] if e >= 0) for d in devices]
    home = [sum(load[d * h:d * h + h]) for d in devices]
    if max(placed) > max(home) * (1 + 1e-6):                 # 3. never worse than homes only
      columns[list(devices)] = -1
  return columns
