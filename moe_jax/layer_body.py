"""The per-device body of the MoE layer (runs inside `shard_map`): assign -> dispatch -> grouped
matmul -> combine, in `num_chunks` independent chunks.

Chunks split this device's token-choices (dropless) or the capacity buffers (capacity) into
pieces that each run their own all-to-all, matmul and all-to-all back. They share no data, so on a
backend with asynchronous collectives XLA may run chunk i + 1's dispatch while chunk i is in the
grouped matmul. Slot assignment happens once, before chunking, so every chunk count gives the same
assignment and the same result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import collectives
from moe_jax import experts
from moe_jax import grouped_matmul
from moe_jax import permute
from moe_jax.config import ExecutionConfig, MoEConfig


def layer_body(x, expert_ids, combine_weights, dispatch_mask, home, replicas, slot_table, *,
               cfg: MoEConfig, execution: ExecutionConfig, mode: str, ordered: bool = False):
  """x <f>[T, d]; expert_ids, combine_weights, dispatch_mask [T, k]; home {name: <f>[h, ...]};
  replicas {name: <f>[r, ...]} ({} when r = 0); slot_table <int32>[De, h + r] (replicated).

  `mode` is the exchange collective actually used ("ragged", "padded" or "emulated_ragged").

  `ordered` (XLA:CPU) runs this device's collectives one after another: each chunk's exchange,
  then the drop count (see `collectives.in_order`).

  Returns:
    (y <f>[T, d], computed choices per local slot <int32>[1, 1, S], dropped choices <int32>[]).
  """
  weights = [home, replicas] if replicas else [home]     # slot order: h home, then r replicas
  weights, x = collectives.vary_in_order(weights, x, enabled=ordered)   # one gradient sum
  num_devices, slots_per_device = slot_table.shape
  source_index = jax.lax.axis_index("data") * num_devices + jax.lax.axis_index("expert")
  num_tokens = x.shape[0]
  capacity = None if execution.dropless else execution.group_capacity(cfg, num_tokens)
  assignment = permute.assign_slots(expert_ids, dispatch_mask, slot_table,
                                    num_experts=cfg.num_experts, source_index=source_index,
                                    capacity=capacity)
  shape = dict(num_devices=num_devices, slots_per_device=slots_per_device)
  if capacity is None:
    y_choice, group_sizes = _dropless(x, assignment, weights, cfg=cfg, execution=execution,
                                      mode=mode, ordered=ordered, **shape)
  else:
    y_choice, group_sizes = _capacity(x, assignment, weights, cfg=cfg, capacity=capacity,
                                      num_chunks=execution.num_chunks, ordered=ordered, **shape)
  y_choice = jnp.where((assignment.slot >= 0)[:, None], y_choice, 0)
  y_choice = y_choice.reshape(cfg.top_k, num_tokens, -1).astype(jnp.float32)  # [k, T, d]
  y = jnp.einsum("ktd,tk->td", y_choice, combine_weights.astype(jnp.float32))
  _, local_dropped = collectives.in_order(y_choice, jnp.sum(assignment.dropped.astype(jnp.int32)),
                                          enabled=ordered)
  dropped = jax.lax.psum(local_dropped, ("data", "expert"))
  return y.astype(x.dtype), group_sizes[None, None, :], dropped


def chunk_bounds(size: int, num_chunks: int) -> list[tuple[int, int]]:
  """Static [lo, hi) pieces of range(size), as even as possible, none empty."""
  edges = np.linspace(0, size, min(num_chunks, max(size, 1)) + 1).round().astype(int)
  return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _dropless(x, assignment, weights, *, cfg, execution, mode, ordered, num_devices,
              slots_per_device):
  """All N = T * k choices in k-major order -> (y_choice <f>[N, d], rows per local slot [S])."""
  outputs, group_sizes = [], 0
  for lo, hi in chunk_bounds(assignment.slot.shape[0], execution.num_chunks):
    piece = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], assignment)
    tokens = (lo + jnp.arange(hi - lo)) % x.shape[0]                      # choice -> token
    rows = x[tokens]
    if outputs:  # this chunk's count all_gather and exchanges after the previous chunk's
      _, (rows, piece) = collectives.in_order(outputs[-1], (rows, piece), enabled=ordered)
    y, sizes = _dropless_chunk(rows, piece, weights, activation=cfg.activation,
                               backend=execution.gmm_backend, mode=mode,
                               num_devices=num_devices, slots_per_device=slots_per_device)
    outputs.append(y)
    group_sizes = group_sizes + sizes
  return jnp.concatenate(outputs, axis=0), group_sizes


def _dropless_chunk(rows, assignment, weights, *, activation, backend, mode, num_devices,
                    slots_per_device):
  """rows <f>[n, d] (one per choice) -> (y <f>[n, d], rows per local slot <int32>[S])."""
  num_slots = num_devices * slots_per_device
  order, slot_counts = permute.sort_by_slot(assignment, num_slots)
  count_matrix = jax.lax.all_gather(slot_counts, "expert")                  # [De, G]
  plan = permute.exchange_plan(count_matrix, jax.lax.axis_index("expert"), slots_per_device)
  sorted_slot = jnp.where(assignment.slot >= 0, assignment.slot, num_slots)[order]
  exchange = dict(count_matrix=count_matrix, slots_per_device=slots_per_device, mode=mode,
                  plan=plan, sorted_slot=sorted_slot)
  received = collectives.dispatch(rows[order], **exchange)                  # [De * n, d]
  y_received = grouped_matmul.grouped_ffn(received, plan.group_sizes, weights,
                                          activation=activation, backend=backend)
  y_sorted = collectives.combine(y_received, **exchange)                    # [n, d]
  return jnp.zeros_like(y_sorted).at[order].set(y_sorted), plan.group_sizes


def _capacity(x, assignment, weights, *, cfg, capacity, num_chunks, ordered, num_devices,
              slots_per_device):
  """Fixed [G, C, d] buffers; chunks split the capacity axis."""
  num_tokens, width = x.shape
  num_slots = num_devices * slots_per_device
  slot = jnp.where(assignment.slot >= 0, assignment.slot, num_slots)
  rows = x[jnp.arange(slot.shape[0]) % num_tokens]                          # [N, d] choice order
  send = jnp.zeros((num_slots, capacity, width), x.dtype)
  send = send.at[slot, assignment.position].set(rows, mode="drop")          # [G, C, d]
  pieces = []
  for lo, hi in chunk_bounds(capacity, num_chunks):
    piece = send[:, lo:hi]
    if pieces:
      _, piece = collectives.in_order(pieces[-1], piece, enabled=ordered)
    pieces.append(_capacity_chunk(piece, weights, cfg=cfg, num_devices=num_devices,
                                  slots_per_device=slots_per_device))
  returned = jnp.concatenate(pieces, axis=1)                                # [G, C, d]
  y_choice = returned[jnp.clip(slot, 0, num_slots - 1),
                      jnp.clip(assignment.position, 0, capacity - 1)]
  slot_counts = jnp.zeros((num_slots,), jnp.int32).at[slot].add(1, mode="drop")
  _, slot_counts = collectives.in_order(returned, slot_counts, enabled=ordered)
  count_matrix = jax.lax.all_gather(slot_counts, "expert")                  # [De, G]
  mine = jax.lax.dynamic_slice_in_dim(
      count_matrix, jax.lax.axis_index("expert") * slots_per_device, slots_per_device, axis=1)
  return y_choice, jnp.sum(mine, axis=0)


def _capacity_chunk(send, weights, *, cfg, num_devices, slots_per_device):
  """send <f>[G, c, d] (this device's rows per global slot) -> the results, same layout."""
  num_slots, c, width = send.shape
  received = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)          # [De(src) * S, c, d]
  received = received.reshape(num_devices, slots_per_device, c, width)
  received = received.transpose(1, 0, 2, 3).reshape(slots_per_device, num_devices * c, width)
  y = experts.capacity_ffn(received, weights, activation=cfg.activation)   # [S, De * c, d]
  y = y.reshape(slots_per_device, num_devices, c, width).transpose(1, 0, 2, 3)
  return jax.lax.all_to_all(y.reshape(num_slots, c, width), "expert", 0, 0, tiled=True)
