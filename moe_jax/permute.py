"""Capacity-aware permutation: token-choices -> slots, and the sort that groups them.

After the real router has picked an expert for every token-choice, each choice is assigned to one
*copy* of that expert (its home slot or a replica). A device splits its choices of expert e over
e's n copies round-robin, starting at an offset given by its own source index, so that the split is
even locally and across devices with no communication. The choice keeps its expert, so the output
cannot change; only the slot that computes it does.

Choices are taken in k-major priority order (all first choices in token order, then all second
choices), as in GShard/Switch: in capacity mode the latest ones overflow first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import placement


@struct.dataclass
class SlotAssignment:
  """Where this device's N = T * k token-choices go, in k-major choice order (q = j * T + t).

  Attributes:
    slot: <int32>[N] destination global slot id, or -1 if the choice is not computed (masked out by
      the router stage, or over capacity).
    position: <int32>[N] rank of the choice among this device's choices for the same slot.
    dropped: <bool>[N] the choice was wanted but exceeded the slot capacity.
  """

  slot: jax.Array
  position: jax.Array
  dropped: jax.Array


def assign_slots(expert_ids: jax.Array, dispatch_mask: jax.Array, slot_table: jax.Array, *,
                 num_experts: int, source_index: jax.Array | int,
                 capacity: int | None = None) -> SlotAssignment:
  """Assigns each token-choice of one source device to a copy of its expert.

  Args:
    expert_ids: <int32>[T, k] the router's choices.
    dispatch_mask: <bool>[T, k] choices to compute.
    slot_table: <int32>[D, S] the slot table (S = h + r slots per device).
    num_experts: E.
    source_index: this device's index among the sources; rotates the round-robin start.
    capacity: per-slot rows available to this source (capacity mode), or None (dropless).

  Returns:
    A `SlotAssignment` over N = T * k choices in k-major order.
  """
  expert_flat = expert_ids.T.reshape(-1)                                  # [N] k-major
  mask_flat = dispatch_mask.T.reshape(-1)
  num_choices = expert_flat.shape[0]

  # 1. Rank of each choice among the masked-in choices of the same expert (stable order).
  key = jnp.where(mask_flat, expert_flat, num_experts)
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]
  group_start = jnp.searchsorted(sorted_key, sorted_key, side="left")
  rank_sorted = jnp.arange(num_choices) - group_start
  rank = jnp.zeros((num_choices,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))

  # 2. Round-robin over the expert's copies, rotated by the source index.
  copies = placement.copies_per_expert(slot_table, num_experts)            # [E]
  slots_of = placement.copy_slots(slot_table, num_experts)                 # [E, D]
  expert_safe = jnp.clip(expert_flat, 0, num_experts - 1)
  n = copies[expert_safe]
  copy = (rank + source_index) % n
  slot = slots_of[expert_safe, copy]
  position = rank // n

  # 3. Capacity: each copy of an expert takes `capacity` rows from this source.
  dropped = jnp.zeros_like(mask_flat)
  if capacity is not None:
    dropped = mask_flat & (position >= capacity)
  keep = mask_flat & ~dropped
  return SlotAssignment(slot=jnp.where(keep, slot, -1).astype(jnp.int32),
                        position=position.astype(jnp.int32), dropped=dropped)


def sort_by_slot(assignment: SlotAssignment, num_slots: int):
  """Stable order of the choices by destination global slot, dropped ones last.

  Returns:
    order: <int32>[N] choice index of each sorted position.
    slot_counts: <int32>[G] choices this device sends to each global slot (G = num_slots).
  """
  key = jnp.where(assignment.slot >= 0, assignment.slot, num_slots)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  slot_counts = jnp.zeros((num_slots,), jnp.int32).at[key].add(1, mode="drop")
  return order, slot_counts


@struct.dataclass
class RaggedParams:
  """Arguments of one `lax.ragged_all_to_all`, one entry per (peer, slot): <int32>[D * S] each."""

  input_offsets: jax.Array
  send_sizes: jax.Array
  output_offsets: jax.Array
  recv_sizes: jax.Array


@struct.dataclass
class ExchangePlan:
  """Size/offset arithmetic of a dispatch over the expert axis and of its reverse (combine).

  The dispatch sends each device's choices, already sorted by global slot, so that every receiver
  gets them laid out slot-major (all rows of its local slot 0 from every source in source order,
  then slot 1, ...): the grouped matmul can run on the receive buffer with no local regroup.

  Attributes:
    dispatch: entry n = global slot n (peer n // S, local slot n % S) on the sending side.
    combine: entry n = (source n // S, my local slot n % S); returns rows to where they came from.
    group_sizes: <int32>[S] rows per local slot in the receive buffer.
    sender_offsets: <int32>[D, G] where source s's rows for global slot n start in its sorted rows.
    receiver_offsets: <int32>[D, G] where those rows start in the receiver's slot-major buffer.
  """

  dispatch: RaggedParams
  combine: RaggedParams
  group_sizes: jax.Array
  sender_offsets: jax.Array
  receiver_offsets: jax.Array


def exchange_plan(count_matrix: jax.Array, index, slots_per_device: int) -> ExchangePlan:
  """Pure size/offset arithmetic for device `index`, from every device's slot counts.

  Args:
    count_matrix: <int32>[D, G] count_matrix[s, n] = choices source s sends to global slot n,
      G = D * S (the all-gathered `slot_counts` of `sort_by_slot`).
    index: this device's position on the expert axis.
    slots_per_device: S.
  """
  num_devices, num_slots = count_matrix.shape
  s = slots_per_device
  sender_offsets = _exclusive_cumsum(count_matrix, axis=1)                  # [D, G]
  totals = jnp.sum(count_matrix, axis=0)                                    # [G]
  slot_start = _exclusive_cumsum(totals.reshape(num_devices, s), axis=1).reshape(num_slots)
  receiver_offsets = slot_start[None, :] + _exclusive_cumsum(count_matrix, axis=0)  # [D, G]
  mine = jax.lax.dynamic_slice_in_dim(jnp.arange(num_slots), index * s, s)  # my global slots
  dispatch = RaggedParams(
      input_offsets=sender_offsets[index], send_sizes=count_matrix[index],
      output_offsets=receiver_offsets[index],
      recv_sizes=count_matrix[:, mine].reshape(num_slots))
  combine = RaggedParams(
      input_offsets=receiver_offsets[:, mine].reshape(num_slots),
      send_sizes=count_matrix[:, mine].reshape(num_slots),
      output_offsets=sender_offsets[:, mine].reshape(num_slots),
      recv_sizes=count_matrix[index])
  return ExchangePlan(dispatch=dispatch, combine=combine, group_sizes=totals[mine],
                      sender_offsets=sender_offsets, receiver_offsets=receiver_offsets)


def padded_send_rows(plan: ExchangePlan, sorted_slot: jax.Array, index, slots_per_device: int,
                     rows_per_peer: int) -> jax.Array:
  """Row of each sorted choice in a padded send buffer [D * rows_per_peer] (peer-major).

  Args:
    sorted_slot: <int32>[N] destination global slot of each sorted choice (>= G: not sent).
  Returns:
    <int32>[N]; D * rows_per_peer (out of range) for choices that are not sent.
  """
  num_devices, num_slots = plan.sender_offsets.shape
  peer = sorted_slot // slots_per_device
  valid = sorted_slot < num_slots
  peer_start = plan.sender_offsets[index][jnp.clip(peer, 0, num_devices - 1) * slots_per_device]
  row = peer * rows_per_peer + jnp.arange(sorted_slot.shape[0]) - peer_start
  return jnp.where(valid, row, num_devices * rows_per_peer).astype(jnp.int32)


def padded_receive_rows(plan: ExchangePlan, count_matrix: jax.Array, index,
                        slots_per_device: int, rows_per_peer: int) -> jax.Array:
  """Slot-major destination of each row of a padded receive buffer [D * rows_per_peer].

  Row (s, m) of the receive buffer is the m-th row source s sent to this device; it lands in the
  same place a ragged dispatch would have written it.

  Returns:
    <int32>[D * rows_per_peer]; D * rows_per_peer (out of range) for padding rows.
  """
  num_devices, _ = count_matrix.shape
  s = slots_per_device
  mine = jax.lax.dynamic_slice_in_dim(jnp.arange(count_matrix.shape[1]), index * s, s)
  seg_start = plan.sender_offsets[:, mine]                                  # [D, S] at the source
  seg_end = seg_start + count_matrix[:, mine]
  u = seg_start[:, :1] + jnp.arange(rows_per_peer)[None, :]                 # [D, M] source row
  local_slot = jnp.sum(u[:, :, None] >= seg_end[:, None, :], axis=-1)       # [D, M]
  valid = local_slot < s
  safe = jnp.clip(local_slot, 0, s - 1)
  dest = (jnp.take_along_axis(plan.receiver_offsets[:, mine], safe, axis=1)
          + u - jnp.take_along_axis(seg_start, safe, axis=1))
  return jnp.where(valid, dest, num_devices * rows_per_peer).reshape(-1).astype(jnp.int32)


def _exclusive_cumsum(x, axis):
  return jnp.cumsum(x, axis=axis) - x
