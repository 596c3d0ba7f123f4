"""The CPU grouped-matmul backend ("windowed").

XLA:CPU lowers `ragged_dot` to about one dense matmul per group over all rows (G times the FLOPs),
and each matmul call pays a fixed cost for packing its weights. So, per weight segment:
  1. when the actual group sizes make it pay (`bulk_pays`), one batched einsum runs the first
     C ~ m + sqrt(m) rows of every group (m = R / G), reading every group's weights in place;
  2. a `while_loop` over the non-empty groups walks row windows that lie inside the group,
     straight out of the sorted rows, for whatever the batched pass left: whole `window`-row
     windows while they fit, then one masked window for the remainder, sized from a ladder
     `tail_window`, 2 * `tail_window`, ..., `window` (the smallest that holds it). Empty groups
     cost nothing. A group's weights are indexed with a traced index, which XLA:CPU copies before
     a matmul: once per group, not once per window.
Rows past `sum(group_sizes)` come back zero, as from every backend.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moe_jax.experts import capacity_ffn, ffn, segments

WINDOW_ROWS = 256
TAIL_WINDOW_ROWS = 8
MIN_TILE_ROWS = 8
# The fixed cost of one expert-FFN matmul call on float32 weights, in rows of FFN FLOPs: XLA:CPU
# packs (reads and rewrites) the weights per call, so a call of M rows costs about (27 + M) rows;
# fitted on d=768, f=3072, and roughly independent of d and f since both the bytes and the
# per-row FLOPs scale with d * f.
WEIGHT_COST_ROWS = 27.0


def windowed_ffn(x, group_sizes, weight_segments, activation, *, window=WINDOW_ROWS,
                 tail_window=TAIL_WINDOW_ROWS, bulk=None):
  """All weight segments' groups through one output buffer; zeros past sum(group_sizes).

  The rows are padded once and every segment writes its rows into the same output in place (a
  per-segment buffer would cost a few [R, d] passes each: measurable next to a small FFN).
  """
  num_rows, _ = x.shape
  x_padded = jnp.pad(x, ((0, window), (0, 0)))     # a window at any valid row stays in bounds
  out = jnp.zeros_like(x_padded)
  for sizes, weights, offset in segments(group_sizes, weight_segments):
    out = _windowed_segment(x_padded, out, sizes, weights, activation, num_rows=num_rows,
                            row_offset=offset, window=window, tail_window=tail_window, bulk=bulk)
  return out[:num_rows]


def _windowed_segment(x, out, group_sizes, weights, activation, *, num_rows, row_offset, window,
                      tail_window, bulk):
  """Writes the FFN of one segment's groups (rows from `row_offset`) into `out` <f>[R + W, d]."""
  plan = window_plan(num_rows, group_sizes.shape[0], window=window, tail_window=tail_window)
  starts = row_offset + jnp.cumsum(group_sizes) - group_sizes
  # 1. The bulk: the first `plan.bulk_rows` rows of every group through one batched FFN, when the
  #    actual group sizes make that cheaper than windows alone.
  if bulk is None:
    use_bulk = bulk_pays(group_sizes, plan, weight_cost_rows=_weight_cost_rows(weights))
  else:
    use_bulk = jnp.asarray(bool(bulk))
  covered = jnp.where(use_bulk, jnp.minimum(group_sizes, plan.bulk_rows), 0)   # [G]
  out = _bulk_pass(x, out, starts, covered, use_bulk, weights, activation, plan.bulk_rows,
                   num_rows)
  # 2. The rest of each group: whole windows, then its remainder in one masked window.
  return _group_windows(x, out, weights, activation, starts=starts + covered,
                        rows=group_sizes - covered, plan=plan)


@dataclasses.dataclass(frozen=True)
class WindowPlan:
  """Static tiling of the windowed backend for R rows in G groups.

  Attributes:
    bulk_rows: rows per group the batched pass takes when it runs (C).
    window: rows of a whole window.
    tiles: ascending sizes of the masked remainder windows; the last is `window`.
  """

  bulk_rows: int
  window: int
  tiles: tuple[int, ...]


def window_plan(num_rows: int, num_groups: int, *, window: int = WINDOW_ROWS,
                tail_window: int = TAIL_WINDOW_ROWS) -> WindowPlan:
  """The windowed backend's tiling, from the static shapes alone.

  With m = R / G rows per group on average, the batched pass takes C = m + sqrt(m) rows of every
  group (most groups fit when the load is balanced), rounded up to a multiple of 8 rows.
  """
  if window < 1 or tail_window < 1:
    raise ValueError(f"window={window} and tail_window={tail_window} must be >= 1 rows; use e.g. "
                     f"window={WINDOW_ROWS}, tail_window={TAIL_WINDOW_ROWS}.")
  mean = num_rows / max(num_groups, 1)
  tiles, tile = [], min(tail_window, window)
  while tile < window:
    tiles.append(tile)
    tile *= 2
  tiles.append(window)
  return WindowPlan(bulk_rows=_round_up(mean + math.sqrt(mean), MIN_TILE_ROWS), window=window,
                    tiles=tuple(tiles))


def bulk_pays(group_sizes: jax.Array, plan: WindowPlan, *,
              weight_cost_rows: float = WEIGHT_COST_ROWS) -> jax.Array:
  """<bool>[]: whether the batched pass plus windows for the overflow beats windows alone.

  A cost model in units of one row's FFN FLOPs, from the actual group sizes: every matmul call
  costs its rows plus `weight_cost_rows` for streaming (packing) one group's weights. The batched
  pass computes C rows of every group, empty or not, reading each group's weights in place once; a
  window computes all its rows for one group (the group's traced weight slice is copied once per
  group, which on the CPUs measured costs little next to the matmuls' own packing). So the batched
  pass wins for balanced loads with many groups of a few dozen rows; windows win when most groups
  are empty or far below C (decoding, skewed loads, or a padded receive buffer whose static size
  overstates the rows that arrive).
  """
  num_groups = group_sizes.shape[0]
  overflow = jnp.maximum(group_sizes - plan.bulk_rows, 0)
  bulk = num_groups * (weight_cost_rows + plan.bulk_rows) + windows_cost(
      overflow, plan, weight_cost_rows=weight_cost_rows)
  return bulk < windows_cost(group_sizes, plan, weight_cost_rows=weight_cost_rows)


def windows_cost(rows: jax.Array, plan: WindowPlan, *,
                 weight_cost_rows: float = WEIGHT_COST_ROWS) -> jax.Array:
  """<f32>[]: cost (rows of FLOPs) of windowing <int32>[G] `rows` per group: whole windows, then
  one tile per non-empty remainder."""
  full = rows // plan.window
  remainder = rows - full * plan.window
  tiles = jnp.asarray(plan.tiles, jnp.float32)[_tile_index(remainder, plan.tiles)]
  cost = full * (weight_cost_rows + plan.window) + jnp.where(
      remainder > 0, weight_cost_rows + tiles, 0.0)
  return jnp.sum(cost)


def _tile_index(rows, tiles):
  """<int32>[G]: index of the smallest tile >= rows (rows <= the last tile)."""
  return jnp.searchsorted(jnp.asarray(tiles, jnp.int32), rows, side="left").astype(jnp.int32)


def _weight_cost_rows(weights):
  """WEIGHT_COST_ROWS scaled by the weights' bytes per element (relative to float32)."""
  return WEIGHT_COST_ROWS * weights["wi"].dtype.itemsize / 4


def _round_up(value, multiple):
  return int(max(multiple, math.ceil(value / multiple) * multiple))


def _bulk_pass(x, out, starts, covered, use_bulk, weights, activation, rows, num_rows):
  """Writes the first `covered[g]` (<= `rows`) rows of every group g through one batched FFN.

  Runs under a `cond` on `use_bulk` (else `out` passes through and `covered` is all 0); the
  gather into and the scatter out of the [G, C, d] buffers are inside it, so a skipped pass
  costs nothing.

  Args:
    x, out: <f>[R + W, d] padded rows and the output being filled.
    starts, covered: <int32>[G] each group's first row and the rows the pass takes from it.

  Returns:
    `out` with the covered rows written.
  """
  def batched(out):
    index = starts[:, None] + jnp.arange(rows)[None, :]                     # [G, C]
    x_bulk = jnp.take(x, jnp.clip(index, 0, num_rows - 1), axis=0)           # [G, C, d]
    y_bulk = capacity_ffn(x_bulk, weights, activation=activation).astype(out.dtype)
    target = jnp.where(jnp.arange(rows)[None, :] < covered[:, None], index, out.shape[0])
    return out.at[target.reshape(-1)].set(y_bulk.reshape(-1, out.shape[1]), mode="drop")

  return jax.lax.cond(use_bulk, batched, lambda out: out, out)


def _group_windows(x, out, weights, activation, *, starts, rows, plan):
  """Runs `rows[g]` rows from `starts[g]` of every group g through its FFN, window by window.

  One loop iteration per non-empty group: it slices that group's weights once (XLA:CPU copies a
  traced weight slice before a matmul, so slicing per window copied [d, f] per window), then runs
  the group's whole `plan.window`-row windows and its remainder in one masked window, the smallest
  tile of `plan.tiles` that holds it. Every inner loop runs 0 or more times in place on `out` (a
  `cond` would copy `out` into its branch). Masked rows past the group's end keep `out`'s values.
  """
  full = rows // plan.window
  remainder = rows - full * plan.window
  tile_index = _tile_index(remainder, plan.tiles)
  busy = rows > 0
  order = jnp.argsort(~busy, stable=True)                    # the non-empty groups first

  def run_windows(out, w, first, count, size, end):
    """`count` consecutive windows of `size` rows from row `first`; masked past `end`."""
    def window(j, out):
      row = first + j * size
      x_win = jax.lax.dynamic_slice_in_dim(x, row, size)                     # [size, d]
      y_win = ffn(x_win, w["wi"], w["wo"], w.get("wi_gate"), activation)
      if end is not None:
        inside = (row + jnp.arange(size)) < end
        y_win = jnp.where(inside[:, None], y_win, jax.lax.dynamic_slice_in_dim(out, row, size))
      return jax.lax.dynamic_update_slice_in_dim(out, y_win.astype(out.dtype), row, axis=0)
    return jax.lax.fori_loop(0, count, window, out)

  def group(i, out):
    g = order[i]
    w = {k: v[g] for k, v in weights.items()}                 # one copy of the group's weights
    out = run_windows(out, w, starts[g], full[g], plan.window, None)
    tail, end = starts[g] + full[g] * plan.window, starts[g] + rows[g]
    for k, tile in enumerate(plan.tiles):                     # 1 trip for the right tile, else 0
      trips = ((remainder[g] > 0) & (tile_index[g] == k)).astype(jnp.int32)
      out = run_windows(out, w, tail, trips, tile, end)
    return out

  return jax.lax.fori_loop(0, jnp.sum(busy.astype(jnp.int32)), group, out)
