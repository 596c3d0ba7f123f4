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


def optimal_placement(load, num_devices: int, num_replica_slots: int):
  """Exhaustive search for the slot table minimising the max expected device load.

  Each expert's load is split evenly over its copies (what the permutation does). Exponential:
  only for tiny cases (a few devices and experts), to measure how far greedy placement is.

  Returns:
    (best max device load, <int32>[D, h + r] table).
  """
  import itertools
  load = np.asarray(load, np.float64)
  num_experts = load.shape[0]
  h = num_experts // num_devices
  options = []
  for dev in range(num_devices):
    others = [e for e in range(num_experts) if e // h != dev]
    dev_options = []
    for n in range(num_replica_slots + 1):
      dev_options += list(itertools.combinations(others, n))
    options.append(dev_options)
  best, best_choice = np.inf, None
  for choice in itertools.product(*options):
    copies = np.ones(num_experts)
    for extra in choice:
      copies[list(extra)] += 1
    per_copy = load / copies
    dev_load = per_copy.reshape(num_devices, h).sum(1)
    for dev, extra in enumerate(choice):
      dev_load[dev] += per_copy[list(extra)].sum()
    if dev_load.max() < best - 1e-12:
      best, best_choice = dev_load.max(), choice
  table = -np.ones((num_devices, h + num_replica_slots), np.int32)
  table[:, :h] = np.arange(num_experts).reshape(num_devices, h)
  for dev, extra in enumerate(best_choice):
    table[dev, h:h + len(extra)] = extra
  return float(best), table
