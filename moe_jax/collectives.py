"""Collectives used inside the MoE layer's `shard_map` body.

* `ragged_exchange`: `lax.ragged_all_to_all` (GPU/TPU) or an emulation of it built from all_gather,
  which lets CPU tests check the same offset arithmetic numerically (XLA:CPU cannot compile the real
  collective).
* `dispatch` / `combine`: move sorted token-choices to the devices holding their slots (slot-major
  on arrival) and back; ragged, emulated-ragged, or a padded all-to-all fallback for CPU.
* `prefetch_replicas`: fill each device's replica slots with exactly the expert weights its row of
  the replica columns names. Its only inputs are the columns and the home weights, so when they
  are known a layer early XLA is free to run it concurrently with that layer.

All of them are differentiable. The padded path is plain autodiff (the transpose of an all_to_all
is an all_to_all; gathers transpose to scatter-adds, so a home expert copied into several replica
slots gets the sum of their gradients). The ragged paths have a `custom_vjp`, the reverse ragged
exchange (`_exchange_bwd`), which also sums rows that were sent more than once (JAX's own
transpose of `ragged_all_to_all` writes such rows once each, keeping only one of the sums' terms).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax import gmm_vjp
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


def vary_in_order(weights, x, *, enabled: bool):
  """(weights cast to vary over every mesh axis x varies over, x), for the layer's weights.

  Expert weights are invariant over 'data' inside the layer; their gradient is summed over
  'data' once, by the transpose of this cast. With `enabled` (XLA:CPU), barriers on both sides of
  the cast order that sum in the backward after every use of x has been differentiated and
  before x's cotangent leaves (see `in_order`): one collective in flight at a time.
  """
  weights, x = in_order(weights, x, enabled=enabled)
  return in_order(gmm_vjp.vary_like(weights, x), x, enabled=enabled)


def ragged_exchange(operand: jax.Array, output: jax.Array, params: permute.RaggedParams, *,
                    mode: str, axis_name: str = EXPERT_AXIS, send_rows: int | None = None
                    ) -> jax.Array:
  """`lax.ragged_all_to_all` ("ragged") or its all_gather emulation ("emulated_ragged").

  Differentiable (a `custom_vjp`, `_exchange_bwd`): the cotangent goes back by the reverse ragged
  exchange, sizes and offsets swapped. `send_rows` bounds the rows this device sends in all
  (sum of `params.send_sizes`): by default the operand's rows, right when no operand row is
  sent twice; an exchange that sends one row to several places (the replica prefetch) passes
  its own bound.
  """
  if mode not in ("ragged", "emulated_ragged"):
    raise ValueError(f"unknown ragged exchange mode {mode!r}")
  send_rows = operand.shape[0] if send_rows is None else send_rows
  # Both vary over the same mesh axes, so each cotangent matches its primal's type.
  operand, output = gmm_vjp.vary_like(operand, output), gmm_vjp.vary_like(output, operand)
  return _exchange(operand, output, params, mode, axis_name, send_rows)


def _exchange_primitive(operand, output, params, mode, axis_name):
  args = (params.input_offsets, params.send_sizes, params.output_offsets, params.recv_sizes)
  if mode == "ragged":
    return jax.lax.ragged_all_to_all(operand, output, *args, axis_name=axis_name)
  return _emulated_ragged_all_to_all(operand, output, *args, axis_name=axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _exchange(operand, output, params, mode, axis_name, send_rows):
  del send_rows
  return _exchange_primitive(operand, output, params, mode, axis_name)


def _exchange_fwd(operand, output, params, mode, axis_name, send_rows):
  result = _exchange(operand, output, params, mode, axis_name, send_rows)
  return result, (operand, params)


def _exchange_bwd(mode, axis_name, send_rows, residuals, d_result):
  """The reverse exchange: every row a peer wrote into my output goes back to where it came from.

  A row of the operand may have been sent several times (to several peers or offsets), and a
  ragged all-to-all overwrites, so the reverse lands in a staging buffer with one region per
  entry (<f>[send_rows, ...], entry n at exclusive_cumsum(send_sizes)[n]) and is then added into
  the operand's rows. The offsets peers used are exchanged first (one small all_to_all of ints).
  """
  operand, params = residuals
  stage_offsets = jnp.cumsum(params.send_sizes) - params.send_sizes             # [K]
  peers = jax.lax.all_to_all(
      jnp.stack([params.output_offsets, params.send_sizes, stage_offsets]), axis_name, 1, 1,
      tiled=True)                                       # [3, K]: peer j's entries aimed at me
  reverse = permute.RaggedParams(input_offsets=peers[0], send_sizes=peers[1],
                                 output_offsets=peers[2], recv_sizes=params.send_sizes)
  staging = jnp.zeros((send_rows,) + operand.shape[1:], d_result.dtype)
  staging = _exchange_primitive(d_result, staging, reverse, mode, axis_name)
  row = jnp.arange(send_rows)
  entry = jnp.clip(jnp.searchsorted(jnp.cumsum(params.send_sizes), row, side="right"), 0,
                   stage_offsets.shape[0] - 1)
  source = params.input_offsets[entry] + row - stage_offsets[entry]
  source = jnp.where(row < jnp.sum(params.send_sizes), source, operand.shape[0])
  d_operand = jnp.zeros_like(operand).at[source].add(staging.astype(operand.dtype), mode="drop")
  written = _covered_rows(reverse.input_offsets, reverse.send_sizes, d_result.shape[0])
  d_output = jnp.where(written.reshape((-1,) + (1,) * (d_result.ndim - 1)), 0, d_result)
  return d_operand, d_output, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _covered_rows(offsets, sizes, num_rows):
  """<bool>[num_rows]: rows inside some [offsets[n], offsets[n] + sizes[n])."""
  edges = jnp.zeros((num_rows + 1,), jnp.int32)
  edges = edges.at[jnp.where(sizes > 0, offsets, num_rows + 1)].add(1, mode="drop")
  edges = edges.at[jnp.where(sizes > 0, offsets + sizes, num_rows + 1)].add(-1, mode="drop")
  return jnp.cumsum(edges)[:num_rows] > 0


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
                                  mode=mode, send_rows=params.send_sizes.shape[0])
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
