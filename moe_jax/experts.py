"""Expert FFNs: grouped matmul over rows sorted by slot, and the capacity-buffer einsum.

`grouped_ffn` hides three interchangeable backends behind one signature:

* "ragged_dot": `jax.lax.ragged_dot`, the right primitive on GPU/TPU.
* "windowed": a CPU path. XLA:CPU lowers `ragged_dot` to about one dense matmul per group over all
  rows (G times the FLOPs), and each matmul call pays a fixed cost for packing its weights. So:
    1. when the actual group sizes make it pay (`bulk_pays`), one batched einsum runs the first
       C ~ m + sqrt(m) rows of every group (m = R / G), reading every group's weights in place;
    2. a `while_loop` over the non-empty groups walks row windows that lie inside the group,
       straight out of the sorted rows, for whatever the batched pass left: whole `window`-row
       windows while they fit, then one masked window for the remainder, sized from a ladder
       `tail_window`, 2 * `tail_window`, ..., `window` (the smallest that holds it). Empty
       groups cost nothing. A group's weights are indexed with a traced index, which XLA:CPU
       copies before a matmul: once per group, not once per window.
* "dense": every group's FFN over every row, masked: the slow, obvious reference.

All backends return zeros for rows past `sum(group_sizes)`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

WINDOW_ROWS = 256
TAIL_WINDOW_ROWS = 8
MIN_TILE_ROWS = 8
# The fixed cost of one expert-FFN matmul call on float32 weights, in rows of FFN FLOPs: XLA:CPU
# packs (reads and rewrites) the weights per call, so a call of M rows costs about (27 + M) rows;
# fitted on d=768, f=3072 (2.0 ms + 0.073 ms/row), and roughly independent of d and f since both
# the bytes and the per-row FLOPs scale with d * f.
WEIGHT_COST_ROWS = 27.0


def ffn(x: jax.Array, wi: jax.Array, wo: jax.Array, wi_gate: jax.Array | None,
        activation: str) -> jax.Array:
  """One expert: <f>[..., d] -> <f>[..., d]. relu: wo(relu(wi x)); silu: wo(silu(wg x) * wi x)."""
  h = jnp.dot(x, wi)
  if activation == "relu":
    h = jax.nn.relu(h)
  elif activation == "silu":
    h = jax.nn.silu(jnp.dot(x, wi_gate)) * h
  else:
    raise ValueError(f"unknown activation {activation!r}; use 'relu' or 'silu'.")
  return jnp.dot(h.astype(wo.dtype), wo)


def default_backend() -> str:
  """'windowed' on CPU, 'ragged_dot' on GPU/TPU."""
  return "windowed" if jax.default_backend() == "cpu" else "ragged_dot"


def grouped_ffn(x: jax.Array, group_sizes: jax.Array, weights, *, activation: str,
                backend: str = "auto", window: int = WINDOW_ROWS,
                tail_window: int = TAIL_WINDOW_ROWS, bulk: bool | None = None) -> jax.Array:
  """Runs rows sorted by group through their group's FFN.

  Args:
    x: <f>[R, d] rows sorted by group; rows past sum(group_sizes) are padding.
    group_sizes: <int32>[G] rows per group.
    weights: {"wi": <f>[G, d, f], "wo": <f>[G, f, d]} (+ "wi_gate": <f>[G, d, f] for silu), or
      a sequence of such dicts whose group counts add up to G (e.g. a device's home experts,
      then its replica slots): segment i's groups follow segment i - 1's. "windowed" and
      "ragged_dot" read each segment in place (one call per segment); "dense" concatenates.
    activation: "relu" or "silu".
    backend: "auto", "ragged_dot", "windowed" or "dense".
    window, tail_window: windowed backend row tiles (keyword-only tuning knobs): whole windows
      of `window` rows, and remainders in one masked window of `tail_window * 2**k` rows.
    bulk: windowed backend: None lets `bulk_pays` decide per call whether the batched pass runs;
      True / False force it on / off (for tests and benchmarks).

  Returns:
    <f>[R, d]; zeros in padding rows.
  """
  if backend == "auto":
    backend = default_backend()
  group_sizes = group_sizes.astype(jnp.int32)
  segments = [weights] if isinstance(weights, dict) else list(weights)
  if backend == "ragged_dot":
    y = _per_segment(group_sizes, segments, lambda sizes, w, offset: _ragged_dot_at(
        x, sizes, w, offset, activation))
  elif backend == "windowed":
    y = _windowed_ffn(x, group_sizes, segments, activation, window=window,
                      tail_window=tail_window, bulk=bulk)
  elif backend == "dense":
    y = _dense_ffn(x, group_sizes, concat_segments(segments), activation)
  else:
    raise ValueError(f"unknown grouped-matmul backend {backend!r}; use 'auto', 'ragged_dot', "
                     "'windowed' or 'dense'.")
  return y.astype(x.dtype)   # every backend leaves rows past sum(group_sizes) zero


def concat_segments(segments) -> dict:
  """One weight dict [G, ...] from a sequence of weight segments (a copy unless there is one)."""
  if len(segments) == 1:
    return segments[0]
  return {k: jnp.concatenate([w[k] for w in segments], axis=0) for k in segments[0]}


def capacity_ffn(x: jax.Array, weights, *, activation: str) -> jax.Array:
  """<f>[G, C, d] -> <f>[G, C, d]: each slot's buffer through its own FFN.

  weights: one weight dict [G, ...], or segments as in `grouped_ffn` (one batched einsum per
  segment over its slots of x, reading the segment's weights in place)."""
  if not isinstance(weights, dict):
    parts, first = [], 0
    for segment in weights:
      count = segment["wi"].shape[0]
      parts.append(capacity_ffn(x[first:first + count], segment, activation=activation))
      first += count
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
  h = jnp.einsum("gcd,gdf->gcf", x, weights["wi"])
  if activation == "relu":
    h = jax.nn.relu(h)
  else:
    h = jax.nn.silu(jnp.einsum("gcd,gdf->gcf", x, weights["wi_gate"])) * h
  return jnp.einsum("gcf,gfd->gcd", h.astype(x.dtype), weights["wo"])


def _segments(group_sizes, segments):
  """Yields (sizes, weights, offset) per weight segment.

  Segment i owns the next `len(weights["wi"])` entries of `group_sizes`, and its rows start at
  `offset`, right after segment i - 1's rows (0, a Python int, for the first). Reading each
  segment in place avoids concatenating their weights (a copy of every expert's weights per
  call)."""
  first, offset = 0, 0
  for weights in segments:
    count = weights["wi"].shape[0]
    sizes = group_sizes[first:first + count]
    yield sizes, weights, offset
    first, offset = first + count, offset + jnp.sum(sizes)


def _per_segment(group_sizes, segments, run):
  """Sum over weight segments of `run(sizes, weights, offset)` -> <f>[R, d]; `run` must return
  zeros outside its segment's rows."""
  parts = [run(*segment) for segment in _segments(group_sizes, segments)]
  return sum(parts[1:], parts[0])


def _ragged_dot_at(x, group_sizes, weights, offset, activation):
  """`ragged_dot` FFN of groups whose rows start at `offset`; zeros in every other row.

  `ragged_dot` has no row offset, so a traced offset rolls the rows to the front and the result
  back: a copy of the activations <f>[R, d], not of the weights.
  """
  shifted = isinstance(offset, jax.Array)
  y = _ragged_dot_ffn(jnp.roll(x, -offset, axis=0) if shifted else x, group_sizes, weights,
                      activation)
  y = jnp.where((jnp.arange(x.shape[0]) < jnp.sum(group_sizes))[:, None], y, 0)
  return jnp.roll(y, offset, axis=0) if shifted else y


def _ragged_dot_ffn(x, group_sizes, weights, activation):
  h = jax.lax.ragged_dot(x, weights["wi"], group_sizes)
  if activation == "relu":
    h = jax.nn.relu(h)
  else:
    h = jax.nn.silu(jax.lax.ragged_dot(x, weights["wi_gate"], group_sizes)) * h
  return jax.lax.ragged_dot(h.astype(x.dtype), weights["wo"], group_sizes)


def _dense_ffn(x, group_sizes, weights, activation):
  ends = jnp.cumsum(group_sizes)
  group_of_row = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
  y = jnp.zeros_like(x)
  for g in range(group_sizes.shape[0]):
    y_g = ffn(x, weights["wi"][g], weights["wo"][g], _gate(weights, g), activation)
    y = jnp.where((group_of_row == g)[:, None], y_g, y)
  return y


def _gate(weights, g):
  return weights["wi_gate"][g] if "wi_gate" in weights else None


def _windowed_ffn(x, group_sizes, segments, activation, *, window, tail_window, bulk):
  """All weight segments' groups through one output buffer; zeros past sum(group_sizes).

  The rows are padded once and every segment writes its rows into the same output in place (a
  per-segment buffer would cost a few [R, d] passes each: measurable next to a small FFN).
  """
  num_rows, _ = x.shape
  x_padded = jnp.pad(x, ((0, window), (0, 0)))     # a window at any valid row stays in bounds
  out = jnp.zeros_like(x_padded)
  for sizes, weights, offset in _segments(group_sizes, segments):
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
