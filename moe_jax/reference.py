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
