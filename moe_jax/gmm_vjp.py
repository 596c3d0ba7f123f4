"""Reverse-mode autodiff of the CPU grouped matmul ("windowed"): a `custom_vjp` whose backward is
itself grouped.

The windowed forward (`experts_cpu.windowed_ffn`) is a data-dependent `while_loop`, which JAX cannot
differentiate in reverse. Its backward here walks the same tiling from the same group sizes
(`experts_cpu.window_plan`, `bulk_pays`), so every matmul it runs reads one group's weights:
  1. the batched pass: the first C rows of every group as [G, C, d] buffers, through the VJP of
     the batched FFN (`experts.capacity_ffn`), when `bulk_pays` says the forward ran it;
  2. per non-empty group, its remaining rows window by window through the VJP of the group's FFN:
     dX rows are written in place, dW of the group is accumulated over its windows in float32
     and added to row g of the weight gradient once.
The VJP of an FFN over a window recomputes that window's hidden activations (the forward keeps
none, so it stays the existing code, bit for bit): per row the forward runs 2 (relu) or 3 (silu)
matmuls, the backward 4 or 6 plus the 1 or 2 it recomputes.
Rows outside a window's group are masked to zero in x and dY, so they add nothing to its dW.
Every weight segment (home experts, replica slots) gets its own gradient, in the segments' order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax import experts
from moe_jax import experts_cpu


def vary_like(tree, like):
  """`tree`'s arrays cast to vary over every mesh axis `like` varies over (inside `shard_map`).

  Expert weights are invariant over the 'data' axis, tokens vary: cast once here, the weights'
  gradient is reduced over 'data' once, by the transpose of this cast, instead of by a psum
  wherever a backward multiplies the two (in a loop over windows: once per window, and a
  collective inside a data-dependent loop cannot even match up across devices). No-op outside
  `shard_map` and in the forward.
  """
  axes = _varying_axes(like)

  def cast(w):
    missing = tuple(sorted(axes - _varying_axes(w)))
    return jax.lax.pcast(w, missing, to="varying") if missing else w

  return jax.tree.map(cast, tree)


def _varying_axes(a) -> frozenset:
  """The mesh axes `a` varies over inside `shard_map` (empty outside); jax >= 0.10 names them
  `manual_axis_type.varying`, earlier versions `vma`."""
  aval = jax.typeof(a)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))


def windowed_ffn(x, group_sizes, weight_segments, activation, *, window=experts_cpu.WINDOW_ROWS,
                 tail_window=experts_cpu.TAIL_WINDOW_ROWS, bulk=None):
  """`experts_cpu.windowed_ffn` (same signature and forward), differentiable in reverse mode.

  Args:
    x: <f>[R, d] rows sorted by group.
    group_sizes: <int32>[G] rows per group (summed over the segments' groups).
    weight_segments: list of {"wi", "wo"[, "wi_gate"]} dicts, [G_i, ...] each.
  Returns:
    <f>[R, d]; zeros past sum(group_sizes).
  """
  return _windowed(x, group_sizes, list(weight_segments), activation, window, tail_window, bulk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _windowed(x, group_sizes, weight_segments, activation, window, tail_window, bulk):
  return experts_cpu.windowed_ffn(x, group_sizes, weight_segments, activation, window=window,
                                  tail_window=tail_window, bulk=bulk)


def _windowed_fwd(x, group_sizes, weight_segments, activation, window, tail_window, bulk):
  y = _windowed(x, group_sizes, weight_segments, activation, window, tail_window, bulk)
  return y, (x, group_sizes, weight_segments)


def _windowed_bwd(activation, window, tail_window, bulk, residuals, dy):
  x, group_sizes, weight_segments = residuals
  dx, dweights = windowed_ffn_vjp(x, group_sizes, weight_segments, dy, activation, window=window,
                                  tail_window=tail_window, bulk=bulk)
  return dx, None, dweights


_windowed.defvjp(_windowed_fwd, _windowed_bwd)


def windowed_ffn_vjp(x, group_sizes, weight_segments, dy, activation, *,
                     window=experts_cpu.WINDOW_ROWS, tail_window=experts_cpu.TAIL_WINDOW_ROWS,
                     bulk=None):
  """(dX <f>[R, d], [dW segment dicts]) of the windowed FFN at (x, weights) for cotangent dy.

  dy <f>[R, d] rows past sum(group_sizes) are ignored (the forward's output is zero there)."""
  num_rows, _ = x.shape
  pad = ((0, window), (0, 0))
  x_padded, dy_padded = jnp.pad(x, pad), jnp.pad(dy.astype(x.dtype), pad)
  dx = jnp.zeros_like(x_padded)
  dweights = []
  for sizes, weights, offset in experts.segments(group_sizes, weight_segments):
    dx, dw = _segment_vjp(x_padded, dy_padded, dx, sizes, weights, activation, num_rows=num_rows,
                          row_offset=offset, window=window, tail_window=tail_window, bulk=bulk)
    dweights.append(dw)
  return dx[:num_rows], dweights


def _segment_vjp(x, dy, dx, group_sizes, weights, activation, *, num_rows, row_offset, window,
                 tail_window, bulk):
  """dX rows of one segment's groups written into `dx` <f>[R + W, d], and the segment's dW."""
  plan = experts_cpu.window_plan(num_rows, group_sizes.shape[0], window=window,
                                 tail_window=tail_window)
  starts = row_offset + jnp.cumsum(group_sizes) - group_sizes
  if bulk is None:   # the forward's decision, from the same sizes and weights
    use_bulk = experts_cpu.bulk_pays(group_sizes, plan,
                                     weight_cost_rows=experts_cpu._weight_cost_rows(weights))  # pylint: disable=protected-access
  else:
    use_bulk = jnp.asarray(bool(bulk))
  covered = jnp.where(use_bulk, jnp.minimum(group_sizes, plan.bulk_rows), 0)      # [G]
  dw = {k: jnp.zeros_like(w, jnp.float32) for k, w in weights.items()}   # (shard_map: varying)
  dx, dw = _bulk_vjp(x, dy, dx, dw, starts, covered, use_bulk, weights, activation,
                     plan.bulk_rows, num_rows)
  dx, dw = _group_windows_vjp(x, dy, dx, dw, weights, activation, starts=starts + covered,
                              rows=group_sizes - covered, plan=plan)
  return dx, {k: dw[k].astype(w.dtype) for k, w in weights.items()}


def _ffn_vjp(x_rows, dy_rows, weights, activation, batched):
  """(dx, dW) of one FFN (or a batch of per-group FFNs) at x_rows for cotangent dy_rows."""
  if batched:
    run = lambda x, w: experts.capacity_ffn(x, w, activation=activation)
  else:
    run = lambda x, w: experts.ffn(x, w["wi"], w["wo"], w.get("wi_gate"), activation)
  y, vjp = jax.vjp(run, x_rows, weights)
  return vjp(dy_rows.astype(y.dtype))


def _bulk_vjp(x, dy, dx, dw, starts, covered, use_bulk, weights, activation, rows, num_rows):
  """The batched pass's backward: the first covered[g] rows of every group g as [G, C, d].

  Args:
    x, dy, dx: <f>[R + W, d] padded rows, their cotangents and the dX being filled.
    dw: {name: <f32>[G, ...]} the segment's weight gradient being accumulated.
  """
  def batched(carry):
    dx, dw = carry
    index = starts[:, None] + jnp.arange(rows)[None, :]                        # [G, C]
    inside = (jnp.arange(rows)[None, :] < covered[:, None])[..., None]         # [G, C, 1]
    safe = jnp.clip(index, 0, num_rows - 1)
    x_bulk = jnp.where(inside, jnp.take(x, safe, axis=0), 0)                   # [G, C, d]
    dy_bulk = jnp.where(inside, jnp.take(dy, safe, axis=0), 0)
    dx_bulk, dw_bulk = _ffn_vjp(x_bulk, dy_bulk, weights, activation, batched=True)
    target = jnp.where(inside[..., 0], index, dx.shape[0])
    dx = dx.at[target.reshape(-1)].set(dx_bulk.reshape(-1, dx.shape[1]).astype(dx.dtype),
                                       mode="drop")
    return dx, {k: dw[k] + dw_bulk[k].astype(jnp.float32) for k in dw}

  return jax.lax.cond(use_bulk, batched, lambda carry: carry, (dx, dw))


def _group_windows_vjp(x, dy, dx, dw, weights, activation, *, starts, rows, plan):
  """The windows' backward: `rows[g]` rows from `starts[g]` of every non-empty group g.

  Same tiling as `experts_cpu._group_windows`; dW of group g is summed over its windows in a
  [1, ...] float32 carry and added to `dw` once per group."""
  full = rows // plan.window
  remainder = rows - full * plan.window
  tile_index = experts_cpu._tile_index(remainder, plan.tiles)   # pylint: disable=protected-access
  busy = rows > 0
  order = jnp.argsort(~busy, stable=True)                       # the non-empty groups first

  def run_windows(carry, w, first, count, size, end):
    """`count` windows of `size` rows from row `first`; rows at or past `end` masked out."""
    def one(j, carry):
      dx, dw_group = carry
      row = first + j * size
      x_win = jax.lax.dynamic_slice_in_dim(x, row, size)                       # [size, d]
      dy_win = jax.lax.dynamic_slice_in_dim(dy, row, size)
      if end is not None:
        inside = ((row + jnp.arange(size)) < end)[:, None]
        x_win, dy_win = jnp.where(inside, x_win, 0), jnp.where(inside, dy_win, 0)
      dx_win, dw_win = _ffn_vjp(x_win, dy_win, w, activation, batched=False)
      dx_win = dx_win.astype(dx.dtype)
      if end is not None:
        dx_win = jnp.where(inside, dx_win, jax.lax.dynamic_slice_in_dim(dx, row, size))
      dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_win, row, axis=0)
      return dx, {k: dw_group[k] + dw_win[k].astype(jnp.float32) for k in dw_group}
    return jax.lax.fori_loop(0, count, one, carry)

  def group(i, carry):
    dx, dw = carry
    g = order[i]
    w = {k: v[g] for k, v in weights.items()}                   # one copy of the group's weights
    dw_group = {k: jnp.zeros_like(v, jnp.float32) for k, v in w.items()}
    inner = run_windows((dx, dw_group), w, starts[g], full[g], plan.window, None)
    tail, end = starts[g] + full[g] * plan.window, starts[g] + rows[g]
    for k, tile in enumerate(plan.tiles):                       # 1 trip for the right tile, else 0
      trips = ((remainder[g] > 0) & (tile_index[g] == k)).astype(jnp.int32)
      inner = run_windows(inner, w, tail, trips, tile, end)
    dx, dw_group = inner
    dw = {k: jax.lax.dynamic_update_index_in_dim(dw[k], dw[k][g] + dw_group[k], g, axis=0)
          for k in dw}
    return dx, dw

  return jax.lax.fori_loop(0, jnp.sum(busy.astype(jnp.int32)), group, (dx, dw))
