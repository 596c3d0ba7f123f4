"""Collectives used inside the MoE layer's `shard_map` body.

* `ragged_exchange`: `lax.ragged_all_to_all` (GPU/TPU) or an emulation of it built from all_gather,
  which lets CPU tests check the same offset arithmetic numerically (XLA:CPU cannot compile the real
  collective).
* `dispatch` / `combine`: move sorted token-choices to the devices holding their slots (slot-major
  on arrival) and back; ragged, emulated-ragged, or a padded all-to-all fallback for CPU.
* `prefetch_replicas`: fill each device's replica slots with exactly the expert weights its row of
  the replica columns names. Its only inputs are the columns and the home weights, so when they
  are known a layer early XLA is free to run it concurrently with that layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax import permute

EXPERT_AXIS = "expert"
DATA_AXIS = "data"


def in_order(first, then, *, enabled: bool):
  """(first, then), with every later use of `then` waiting for `first` when `enabled`.

  For XLA:CPU, where collectives are synchronous and block a pool thread while they wait for
  their peers: with several independent collectives of one device in flight, the threads can run
  out before every device arrives and the rendezvous aborts (seen with jax 0.10.2 on 2 cores: one
  device waiting in a prefetch-side all-gather and a dispatch all-to-all at once). Ordering costs
  nothing there; on GPU/TPU (`enabled=False`) the independence is what lets XLA overlap them.
  """
  if not enabled:
    return first, then
  return jax.lax.optimization_barrier((first, then))


def ragged_exchange(operand: jax.Array, output: jax.Array, params: permute.RaggedParams, *,
                    mode: str, axis_name: str = EXPERT_AXIS) -> jax.Array:
  """`lax.ragged_all_to_all` ("ragged") or its all_gather emulation ("emulated_ragged")."""
  args = (params.input_offsets, params.send_sizes, params.output_offsets, params.recv_sizes)
  if mode == "ragged":
    return jax.lax.ragged_all_to_all(operand, output, *args, axis_name=axis_name)
  if mode == "emulated_ragged":
    return _emulated_ragged_all_to_all(operand, output, *args, axis_name=axis_name)
  raise ValueError(f"unknown ragged exchange mode {mode!r}")


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """Same result as `lax.ragged_all_to_all`, via all_gather (slow; for testing the arithmetic)."""
  del recv_sizes  # implied by the senders' send_sizes
  index = jax.lax.axis_index(axis_name)
  num_devices = jax.lax.psum(1, axis_name)
  all_operand = jax.lax.all_gather(operand, axis_name)                      # [D, N, ...]
  all_in = jax.lax.all_gather(input_offsets, axis_name)                     # [D, K]
  all_size = jax.lax.all_gather(send_sizes, axis_name)
  all_out = jax.lax.all_gather(output_offsets, axis_name)
  per_peer = input_offsets.shape[0] // num_devices
  entries = index * per_peer + jnp.arange(per_peer)                         # entries aimed at me
  start = all_out[:, entries].reshape(-1)                                   # [D * P]
  size = all_size[:, entries].reshape(-1)
  source_row = all_in[:, entries].reshape(-1)
  source_dev = jnp.repeat(jnp.arange(num_devices), per_peer)
  rows = jnp.arange(output.shape[0])
  covered = (rows[:, None] >= start[None, :]) & (rows[:, None] < (start + size)[None, :])
  segment = jnp.argmax(covered, axis=1)
  hit = jnp.any(covered, axis=1)
  src_row = jnp.clip(source_row[segment] + rows - start[segment], 0, operand.shape[0] - 1)
  gathered = all_operand[source_dev[segment], src_row]
  hit = hit.reshape((-1,) + (1,) * (output.ndim - 1))
  return jnp.where(hit, gathered, output)


def dispatch(x_sorted: jax.Array, plan: permute.ExchangePlan, sorted_slot: jax.Array, *,
             count_matrix: jax.Array, slots_per_device: int, mode: str) -> jax.Array:
  """Sends sorted choices to their slots' devices.

  Args:
    x_sorted: <f>[N, d] this device's choices sorted by global slot.
    plan: the exchange plan of this device.
    sorted_slot: <int32>[N] global slot of each sorted row (>= G for rows not sent).
    count_matrix: <int32>[D, G] all-gathered slot counts.
    slots_per_device: S.
    mode: "ragged", "emulated_ragged" or "padded".

  Returns:
    <f>[D * N, d] received rows, slot-major; rows past sum(plan.group_sizes) are zero.
  """
  num_rows, width = x_sorted.shape
  num_devices = count_matrix.shape[0]
  index = jax.lax.axis_index(EXPERT_AXIS)
  recv = jnp.zeros((num_devices * num_rows, width), x_sorted.dtype)
  if mode != "padded":
    return ragged_exchange(x_sorted, recv, plan.dispatch, mode=mode)
  send_rows = permute.padded_send_rows(plan, sorted_slot, index, slots_per_device, num_rows)
  send = jnp.zeros((num_devices * num_rows, width), x_sorted.dtype)
  send = send.at[send_rows].set(x_sorted, mode="drop")
  received = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)         # [D * N, d] by source
  dest = permute.padded_receive_rows(plan, count_matrix, index, slots_per_device, num_rows)
  return recv.at[dest].set(received, mode="drop")


def combine(y_slot_major: jax.Array, plan: permute.ExchangePlan, sorted_slot: jax.Array, *,
            count_matrix: jax.Array, slots_per_device: int, mode: str) -> jax.Array:
  """Inverse of `dispatch`: <f>[D * N, d] slot-major results -> <f>[N, d] in sorted order."""
  num_devices = count_matrix.shape[0]
  num_rows = y_slot_major.shape[0] // num_devices
  index = jax.lax.axis_index(EXPERT_AXIS)
  back = jnp.zeros((num_rows, y_slot_major.shape[1]), y_slot_major.dtype)
  if mode != "padded":
    return ragged_exchange(y_slot_major, back, plan.combine, mode=mode)
  dest = permute.padded_receive_rows(plan, count_matrix, index, slots_per_device, num_rows)
  send = jnp.take(y_slot_major, dest, axis=0, mode="fill", fill_value=0)    # by source, padded
  returned = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)        # [D * N, d] by peer
  send_rows = permute.padded_send_rows(plan, sorted_slot, index, slots_per_device, num_rows)
  return jnp.take(returned, send_rows, axis=0, mode="fill", fill_value=0)


def replica_sources(columns: jax.Array, num_home: int) -> tuple[jax.Array, jax.Array]:
  """For replica slot (dev, c): the home device and home column of the expert it holds.

  Args:
    columns: <int32>[D, r] the replica columns (expert per replica slot, -1 empty).
    num_home: h, home slots per device.

  Returns:
    (home_device, home_column), each <int32>[D, r]; -1 for empty slots.
  """
  filled = columns >= 0
  return (jnp.where(filled, columns // num_home, -1), jnp.where(filled, columns % num_home, -1))


def prefetch_params(columns: jax.Array, num_home: int, index) -> permute.RaggedParams:
  """Ragged all-to-all arguments that send home weights straight into replica slots.

  One entry per (peer, replica column c): this device sends its home expert for peer's slot c
  (one row of the home-weight operand, or nothing), written at row c of the peer's replica buffer.
  """
  home_device, home_column = replica_sources(columns, num_home)             # [D, r]
  num_devices, num_replicas = home_device.shape
  mine = home_device == index                                              # I send these
  from_peer = home_device[index]                                           # [r] my sources
  return permute.RaggedParams(
      input_offsets=jnp.where(mine, home_column, 0).reshape(-1),
      send_sizes=mine.astype(jnp.int32).reshape(-1),
      output_offsets=jnp.broadcast_to(jnp.arange(num_replicas), (num_devices, num_replicas)
                                      ).reshape(-1).astype(jnp.int32),
      recv_sizes=(jnp.arange(num_devices)[:, None] == from_peer[None, :]
                  ).astype(jnp.int32).reshape(-1))


def prefetch_replicas(home_weights: dict, columns: jax.Array, *, mode: str) -> dict:
  """Inside shard_map: this device's replica weights for its row of the replica columns.

  Args:
    home_weights: {name: <f>[h, ...]} this device's home experts.
    columns: <int32>[D, r] the (replicated) replica columns.
    mode: "ragged", "emulated_ragged" or "padded".

  Returns:
    {name: <f>[r, ...]}; zeros in empty replica slots.
  """
  num_home = next(iter(home_weights.values())).shape[0]
  num_replicas = columns.shape[1]
  if num_replicas == 0:
    return {name: jnp.zeros((0,) + w.shape[1:], w.dtype) for name, w in home_weights.items()}
  index = jax.lax.axis_index(EXPERT_AXIS)
  if mode != "padded":
    params = prefetch_params(columns, num_home, index)
    return {name: ragged_exchange(w, jnp.zeros((num_replicas,) + w.shape[1:], w.dtype), params,
                                  mode=mode)
            for name, w in home_weights.items()}
  # Padded fallback: one fixed cell per (peer, replica column); only cells this device is the
  # home of are filled, the rest travel as zeros. Moves D x the needed bytes; CPU only.
  home_device, home_column = replica_sources(columns, num_home)
  mine = (home_device == index)
  from_peer = home_device[index]                                           # [r]
  out = {}
  for name, w in home_weights.items():
    cells = jnp.take(w, jnp.clip(home_column, 0), axis=0)                  # [D, r, ...]
    cells = jnp.where(mine.reshape(mine.shape + (1,) * (w.ndim - 1)), cells, 0)
    received = jax.lax.all_to_all(cells, EXPERT_AXIS, 0, 0, tiled=True)     # [D(src), r, ...]
    picked = received[jnp.clip(from_peer, 0), jnp.arange(num_replicas)]
    filled = (from_peer >= 0).reshape((-1,) + (1,) * (w.ndim - 1))
    out[name] = jnp.where(filled, picked, 0)
  return out
