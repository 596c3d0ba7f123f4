"""Expert FFNs: grouped matmul over rows sorted by slot, and the capacity-buffer einsum.

`grouped_ffn` hides three interchangeable backends behind one signature:

* "ragged_dot": `jax.lax.ragged_dot`, the right primitive on GPU/TPU.
* "windowed": a CPU path. XLA:CPU lowers `ragged_dot` to about one dense matmul per group over all
  rows (G times the FLOPs), so instead a `while_loop` walks fixed-size row windows that lie inside
  one group, straight out of the sorted rows, and runs the whole FFN per window. Windows are large
  (`window` rows) for the bulk of a group and small (`tail_window` rows) for its remainder, so the
  wasted rows per group are < `tail_window` and each matmul is big enough to keep both cores busy.
* "dense": every group's FFN over every row, masked: the slow, obvious reference.

All backends return zeros for rows past `sum(group_sizes)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WINDOW_ROWS = 256
TAIL_WINDOW_ROWS = 64


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


def grouped_ffn(x: jax.Array, group_sizes: jax.Array, weights: dict, *, activation: str,
                backend: str = "auto", window: int = WINDOW_ROWS,
                tail_window: int = TAIL_WINDOW_ROWS) -> jax.Array:
  """Runs rows sorted by group through their group's FFN.

  Args:
    x: <f>[R, d] rows sorted by group; rows past sum(group_sizes) are padding.
    group_sizes: <int32>[G] rows per group.
    weights: {"wi": <f>[G, d, f], "wo": <f>[G, f, d]} (+ "wi_gate": <f>[G, d, f] for silu).
    activation: "relu" or "silu".
    backend: "auto", "ragged_dot", "windowed" or "dense".
    window, tail_window: windowed backend row tiles (keyword-only tuning knobs).

  Returns:
    <f>[R, d]; zeros in padding rows.
  """
  if backend == "auto":
    backend = default_backend()
  group_sizes = group_sizes.astype(jnp.int32)
  if backend == "ragged_dot":
    y = _ragged_dot_ffn(x, group_sizes, weights, activation)
  elif backend == "windowed":
    y = _windowed_ffn(x, group_sizes, weights, activation, window=window, tail_window=tail_window)
  elif backend == "dense":
    y = _dense_ffn(x, group_sizes, weights, activation)
  else:
    raise ValueError(f"unknown grouped-matmul backend {backend!r}; use 'auto', 'ragged_dot', "
                     "'windowed' or 'dense'.")
  valid = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], y, 0).astype(x.dtype)


def capacity_ffn(x: jax.Array, weights: dict, *, activation: str) -> jax.Array:
  """<f>[G, C, d] -> <f>[G, C, d]: each slot's buffer through its own FFN (one batched einsum)."""
  h = jnp.einsum("gcd,gdf->gcf", x, weights["wi"])
  if activation == "relu":
    h = jax.nn.relu(h)
  else:
    h = jax.nn.silu(jnp.einsum("gcd,gdf->gcf", x, weights["wi_gate"])) * h
  return jnp.einsum("gcf,gfd->gcd", h.astype(x.dtype), weights["wo"])


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


def _windowed_ffn(x, group_sizes, weights, activation, *, window, tail_window):
  num_rows, _ = x.shape
  starts = jnp.cumsum(group_sizes) - group_sizes
  full = group_sizes // window
  # Pad so a window starting at any valid row never reads or writes past the end.
  x_padded = jnp.pad(x, ((0, window), (0, 0)))
  out = jnp.zeros_like(x_padded)
  # 1. Full windows: every row belongs to the group.
  out = _window_loop(x_padded, out, weights, activation, starts=starts, windows=full,
                     window=window, group_end=None)
  # 2. The remainder of each group in small windows; rows past the group's end are masked.
  tail_starts = starts + full * window
  tail_rows = group_sizes - full * window
  tails = (tail_rows + tail_window - 1) // tail_window
  out = _window_loop(x_padded, out, weights, activation, starts=tail_starts, windows=tails,
                     window=tail_window, group_end=starts + group_sizes)
  return out[:num_rows]


def _window_loop(x, out, weights, activation, *, starts, windows, window, group_end):
  """Runs `windows[g]` consecutive windows of `window` rows from `starts[g]` for every group g."""
  ends = jnp.cumsum(windows)
  total = ends[-1]
  firsts = ends - windows

  def body(i, out):
    g = jnp.searchsorted(ends, i, side="right")
    row = starts[g] + (i - firsts[g]) * window
    x_win = jax.lax.dynamic_slice_in_dim(x, row, window)                     # [W, d]
    gate = weights["wi_gate"][g] if "wi_gate" in weights else None
    y_win = ffn(x_win, weights["wi"][g], weights["wo"][g], gate, activation)
    if group_end is not None:
      inside = (row + jnp.arange(window)) < group_end[g]
      y_win = jnp.where(inside[:, None], y_win, jax.lax.dynamic_slice_in_dim(out, row, window))
    return jax.lax.dynamic_update_slice_in_dim(out, y_win.astype(out.dtype), row, axis=0)

  return jax.lax.fori_loop(0, total, body, out)
