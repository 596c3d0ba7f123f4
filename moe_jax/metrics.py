"""Metrics defined once and reported everywhere (the report, the plots, the simulator).

  balancedness   mean / max tokens per device (1.0 is perfect)   -> placement.balancedness
  maxvio         max / mean - 1                                   -> placement.maxvio
  drop rate      dropped token-choices / all token-choices
  hit rate       fraction of tokens whose predicted top-1 expert is the router's top-1
  recall@K       fraction of the router's top-k choices found in the predictor's top-K
  load L1 error  sum |pred - true| / sum true, with pred rescaled to the true total
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import placement
from moe_jax.placement import balancedness, maxvio  # noqa: F401  (re-exported)


def drop_rate(dropped, total) -> float:
  total = float(total)
  return float(dropped) / total if total > 0 else 0.0


def hit_rate(predicted_top1, true_ids) -> float:
  """predicted_top1 <int>[T] (-1: no prediction) vs the router's true_ids <int>[T, k]."""
  predicted_top1 = np.asarray(predicted_top1).reshape(-1)
  true_top1 = np.asarray(true_ids).reshape(predicted_top1.shape[0], -1)[:, 0]
  if predicted_top1.size == 0 or np.all(predicted_top1 < 0):
    return float("nan")
  return float(np.mean(predicted_top1 == true_top1))


def recall_at(predicted_logits, true_ids, k: int) -> float:
  """Fraction of the true choices <int>[T, kk] among the top-k of predicted_logits <f>[T, E]."""
  predicted_logits = np.asarray(predicted_logits)
  true_ids = np.asarray(true_ids).reshape(predicted_logits.shape[0], -1)
  top = np.argsort(-predicted_logits, axis=-1)[:, :k]
  found = (true_ids[:, :, None] == top[:, None, :]).any(-1)
  return float(found.mean())


def load_l1_error(predicted_load, true_load) -> float:
  predicted = np.asarray(predicted_load, np.float64)
  true = np.asarray(true_load, np.float64)
  if true.sum() <= 0:
    return 0.0
  if predicted.sum() <= 0:
    return float("nan")
  predicted = predicted * true.sum() / predicted.sum()
  return float(np.abs(predicted - true).sum() / true.sum())


def expected_balancedness(true_load, slot_table) -> float:
  """Balancedness that `slot_table` gives the true per-expert loads (even split over copies)."""
  return float(placement.balancedness(placement.device_load(
      jnp.asarray(true_load, jnp.float32), jnp.asarray(slot_table))))


def oracle_balancedness(true_load, num_devices: int, num_replica_slots: int) -> float:
  """Balancedness of the placement computed from the true loads themselves."""
  table = jax.jit(placement.place, static_argnums=(1, 2))(
      jnp.asarray(true_load, jnp.float32), num_devices, num_replica_slots)
  return expected_balancedness(true_load, table)
