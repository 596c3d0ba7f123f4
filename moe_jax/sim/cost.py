"""The cost model: per-device time of one expert-parallel MoE layer, and of a step of layers.

One MoE layer on a mesh of Dd (data) x De (expert) devices runs, in each data row, four phases
separated by collectives, so each phase lasts as long as its slowest device:

  dense     T_dev * dense_flops_per_token / FLOP/s             (router etc., data-parallel)
  dispatch  all-to-all of token rows to the devices holding their expert
  gemm      per device max(tokens * FLOPs per choice / FLOP/s, active slots * expert bytes / HBM)
            (a grouped GEMM is compute- or weight-read-bound, whichever is slower: a roofline)
  assemble  replicating layers only, with `assemble_weights`: concatenating the home and
            replica weights of every slot into one stack per layer, reading and writing
            (h + r) experts' weights at HBM speed (what moe_jax did before its grouped matmuls
            read weight segments in place; kept to show what that costs)
  combine   the reverse all-to-all
  overhead  `Cluster.layer_overhead_s`, a fitted fixed cost per layer (0 for the presets)

An expert's tokens are split evenly over its copies (what moe_jax's permutation does). All-to-all
time per device is max(bytes sent, bytes received) / bandwidth + latency, with sources assumed
uniform (each device is the source of T_dev tokens). `Cluster.padded_all_to_all` models moe_jax's
CPU fallback instead: every device sends a worst-case buffer of T_dev * k rows to every peer.

Replica weights for layer l move during layer l - 1 (`Cluster.overlap_prefetch`), so only what
exceeds layer l - 1's time is exposed; without overlap, or for the first layer, all of it is.
The rows of the data axis run concurrently; a layer lasts as long as its slowest row.

Two phases (`PHASES`). `prefill` (and training-style batches) is the roofline above, with each
expert's tokens split fractionally over its copies. `decode` (a few rows per expert per step)
replaces the gemm by weight bandwidth plus per-row compute: each expert's choices are dealt
round-robin over its copies in whole rows (`slot_rows`), and a device pays a full weight read for
every slot (home or replica) dealt >= 1 row, plus its rows' FLOPs (`decode_seconds`): a replica
splits the hot expert's rows but its read is paid again, on the device that holds it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax.sim.cluster import Cluster, ExpertShape

PHASES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """Seconds of one MoE layer (each phase: max over devices and data rows).

  Attributes:
    time_s: dense + dispatch + gemm + assemble + combine + overhead (`Cluster.layer_overhead_s`).
    prefetch_s: moving this layer's replica weights (exposed or not: see `step_cost`).
    device_tokens: <f64>[Dd, De] token-choices computed per device.
  """

  time_s: float
  dense_s: float
  dispatch_s: float
  gemm_s: float
  assemble_s: float
  combine_s: float
  prefetch_s: float
  device_tokens: np.ndarray
  overhead_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Seconds of one step (all MoE layers): time_s = sum of layers + exposed prefetch."""

  time_s: float
  layer_s: np.ndarray          # <f64>[L] layer times without prefetch
  exposed_prefetch_s: np.ndarray  # <f64>[L]
  max_device_tokens: np.ndarray   # <f64>[L] tokens on the busiest device, max over rows


def device_tokens(expert_tokens: np.ndarray, slot_table: np.ndarray) -> np.ndarray:
  """<f64>[De] token-choices per device when each expert's tokens split evenly over its copies.

  Args:
    expert_tokens: <f>[E] token-choices routed to each expert (one data row).
    slot_table: <int>[De, h + r] expert held by each slot (-1: empty).
  """
  expert_tokens = np.asarray(expert_tokens, np.float64)
  table = np.asarray(slot_table)
  held = table >= 0
  copies = np.bincount(table[held], minlength=expert_tokens.shape[0])
  per_copy = expert_tokens / np.maximum(copies, 1)
  return np.where(held, per_copy[np.clip(table, 0, None)], 0.0).sum(axis=1)


def gemm_seconds(expert_tokens, slot_table, shape: ExpertShape, cluster: Cluster) -> np.ndarray:
  """<f64>[De] grouped-GEMM time per device: max(compute, reading the weights of active slots)."""
  tokens = device_tokens(expert_tokens, slot_table)
  table = np.asarray(slot_table)
  active = (table >= 0) & (np.asarray(expert_tokens)[np.clip(table, 0, None)] > 0)
  compute = tokens * shape.flops_per_choice / cluster.flops_per_s
  weights = active.sum(axis=1) * shape.expert_bytes / cluster.hbm_bytes_per_s
  return np.maximum(compute, weights)


def slot_rows(expert_tokens, slot_table) -> np.ndarray:
  """<f64>[..., De, h + r] whole rows per slot: each expert's choices dealt round-robin over its
  copies, in the table's row-major order (copy j of c gets n // c, plus 1 if j < n % c).

  Args:
    expert_tokens: <f>[..., E] token-choices per expert (rounded to whole rows), any leading axes.
    slot_table: <int>[De, h + r] expert held by each slot (-1: empty).
  """
  tokens = np.rint(np.asarray(expert_tokens, np.float64))
  table = np.asarray(slot_table)
  flat = table.ravel()
  order = np.argsort(flat, kind="stable")
  first = np.searchsorted(flat[order], flat[order], side="left")
  rank = np.empty_like(flat)
  rank[order] = np.arange(flat.size) - first                   # copy index of every slot
  held = flat >= 0
  copies = np.bincount(flat[held], minlength=tokens.shape[-1])
  expert = np.clip(flat, 0, None)
  n, c = tokens[..., expert], np.maximum(copies[expert], 1)
  rows = np.where(held, n // c + (rank < n % c), 0.0)
  return rows.reshape(tokens.shape[:-1] + table.shape)


def decode_seconds(rows, shape: ExpertShape, cluster: Cluster) -> np.ndarray:
  """<f64>[..., De] decode time per device from rows per slot <f>[..., De, h + r]: a full weight
  read for every slot with >= 1 row (an idle slot reads nothing) + per-row compute."""
  rows = np.asarray(rows, np.float64)
  reads = (rows > 0).sum(axis=-1) * shape.expert_bytes / cluster.weight_read_bytes_per_s
  return reads + rows.sum(axis=-1) * shape.flops_per_choice / cluster.row_flops_per_s


def all_to_all_seconds(expert_tokens, slot_table, choices_per_device: float, shape: ExpertShape,
                       cluster: Cluster) -> np.ndarray:
  """<f64>[De] one direction (dispatch or combine) of the token all-to-all, per device.

  Args:
    expert_tokens: <f>[E] token-choices per expert in this data row.
    slot_table: <int>[De, h + r].
    choices_per_device: token-choices each device is the source of (T_dev * k).
  """
  tokens = device_tokens(expert_tokens, slot_table)
  num_devices = tokens.shape[0]
  if num_devices == 1:
    return np.zeros((1,))
  if cluster.padded_all_to_all:
    rows = np.full((num_devices,), (num_devices - 1) * choices_per_device)
  else:
    share = tokens / max(tokens.sum(), 1e-30)          # where a source's choices land
    sent = choices_per_device * (1.0 - share)
    received = tokens * (1.0 - 1.0 / num_devices)
    rows = np.maximum(sent, received)
  return rows * shape.token_bytes / cluster.a2a_bytes_per_s + cluster.latency_s


def prefetch_seconds(slot_table, shape: ExpertShape, cluster: Cluster, *,
                     replicating: bool = True, previous_table=None) -> float:
  """Time to fill the table's replica slots from the home devices (max over devices).

  Ragged: a device receives the replicas it will hold and its home experts go to every device that
  copies them. Padded (moe_jax's CPU fallback): every replicating layer sends r weight cells to
  every peer, filled or not. With `previous_table` (replicas kept resident between steps), a slot
  that already holds the same expert moves nothing; padded, each replica column is then its own
  exchange, skipped when no device's slot in it changed (`replicas.refresh`).
  """
  table = np.asarray(slot_table)
  num_devices, slots = table.shape
  home = shape.num_experts // num_devices
  replicas = slots - home
  if not replicating or replicas == 0 or num_devices == 1:
    return 0.0
  if cluster.padded_all_to_all:
    exchanges = 1
    if previous_table is not None:
      replicas = exchanges = int(np.any(table[:, home:] != np.asarray(previous_table)[:, home:],
                                        axis=0).sum())
    moved = (num_devices - 1) * replicas * shape.expert_bytes
    return moved / cluster.a2a_bytes_per_s + cluster.latency_s * exchanges
  filled = table[:, home:].copy()
  if previous_table is not None:                # already on that device (any replica column)
    previous = np.asarray(previous_table)[:, home:]
    filled[(filled[:, :, None] == previous[:, None, :]).any(-1)] = -1
  if not (filled >= 0).any():
    return 0.0
  received = (filled >= 0).sum(axis=1)
  sent = np.bincount(filled[filled >= 0] // home, minlength=num_devices)
  moved = np.maximum(received, sent).max() * shape.expert_bytes
  return moved / cluster.a2a_bytes_per_s + cluster.latency_s


def layer_cost(row_tokens, slot_table, tokens_per_device: float, shape: ExpertShape,
               cluster: Cluster, *, replicating: bool = True, previous_table=None,
               assemble_weights: bool = False, phase: str = "prefill",
               rows_per_slot=None) -> LayerCost:
  """Cost of one MoE layer.

  Args:
    row_tokens: <f>[Dd, E] token-choices per expert in each data row.
    slot_table: <int>[De, h + r] the (shared) slot table.
    tokens_per_device: T_dev, tokens each device is the source of.
    shape, cluster: the layer and the hardware.
    replicating: whether replicas are prefetched for this layer at all (policy != none).
    previous_table: this layer's table of the previous step, when replicas stay resident between
      steps (only changed slots move; `ReplicationConfig(resident=True)`); None: every replica is
      fetched (the library default).
    assemble_weights: replicating layers copy home + replica weights into one stack; False
      (moe_jax's grouped matmuls, which read the weight segments in place).
    phase: "prefill" (roofline gemm) or "decode" (weight reads of active slots + per-row
      compute; see the module docstring).
    rows_per_slot: decode only, optional <f>[Dd, De, h + r] measured rows per slot (e.g.
      `MoEStats.tokens_per_slot`) instead of the round-robin deal of `slot_rows`.
  """
  row_tokens = np.atleast_2d(np.asarray(row_tokens, np.float64))
  choices = tokens_per_device * shape.top_k
  a2a = np.stack([all_to_all_seconds(r, slot_table, choices, shape, cluster) for r in row_tokens])
  gemm, computed = _expert_seconds(row_tokens, slot_table, shape, cluster, phase, rows_per_slot)
  dense = tokens_per_device * shape.dense_flops_per_token / cluster.flops_per_s
  dispatch = combine = float(a2a.max())
  slots = np.asarray(slot_table).shape[1]
  assemble = (2.0 * slots * shape.expert_bytes / cluster.hbm_bytes_per_s
              if replicating and assemble_weights else 0.0)
  overhead = cluster.layer_overhead_s
  time = dense + dispatch + float(gemm.max()) + assemble + combine + overhead
  return LayerCost(time_s=time, dense_s=dense, dispatch_s=dispatch, gemm_s=float(gemm.max()),
                   assemble_s=assemble, combine_s=combine, overhead_s=overhead,
                   prefetch_s=prefetch_seconds(slot_table, shape, cluster, replicating=replicating,
                                               previous_table=previous_table),
                   device_tokens=computed)


def _expert_seconds(row_tokens, slot_table, shape, cluster, phase, rows_per_slot):
  """(<f64>[Dd, De] expert time per device, <f64>[Dd, De] choices computed per device)."""
  if phase not in PHASES:
    raise ValueError(f"phase={phase!r}: use one of {PHASES}.")
  if phase == "prefill":
    if rows_per_slot is not None:
      raise ValueError("rows_per_slot is a decode input; drop it for phase='prefill'.")
    return (np.stack([gemm_seconds(r, slot_table, shape, cluster) for r in row_tokens]),
            np.stack([device_tokens(r, slot_table) for r in row_tokens]))
  rows = (slot_rows(row_tokens, slot_table) if rows_per_slot is None
          else np.asarray(rows_per_slot, np.float64).reshape(
              (row_tokens.shape[0],) + np.shape(slot_table)))
  return decode_seconds(rows, shape, cluster), rows.sum(axis=-1)


def step_cost(layers: list[LayerCost], cluster: Cluster) -> StepCost:
  """Sum of the layers plus the prefetch time each layer's compute could not hide."""
  times = np.array([c.time_s for c in layers])
  prefetch = np.array([c.prefetch_s for c in layers])
  hidden = np.zeros_like(prefetch)
  if cluster.overlap_prefetch:
    hidden[1:] = times[:-1]          # layer l's weights move while layer l - 1 computes
  exposed = np.maximum(prefetch - hidden, 0.0)
  return StepCost(time_s=float(times.sum() + exposed.sum()), layer_s=times,
                  exposed_prefetch_s=exposed,
                  max_device_tokens=np.array([c.device_tokens.max() for c in layers]))
