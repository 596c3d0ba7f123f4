"""Expert FFNs: the per-expert FFN, the shared grouped-matmul pieces, and the capacity einsum.

The grouped matmul over rows sorted by slot has three interchangeable backends behind one
signature, `grouped_matmul.grouped_ffn`: "ragged_dot" and the "dense" reference live here, the
CPU "windowed" backend in `experts_cpu`. A device's home experts and its replica slots are two
weight *segments*; backends read each segment in place (`segments`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def activate(h: jax.Array, gate, activation: str) -> jax.Array:
  """The FFN's hidden activation of h = x wi: relu(h), or silu(gate()) * h (gate() = x wi_gate)."""
  if activation == "relu":
    return jax.nn.relu(h)
  if activation == "silu":
    return jax.nn.silu(gate()) * h
  raise ValueError(f"unknown activation {activation!r}; use 'relu' or 'silu'.")


def ffn(x: jax.Array, wi: jax.Array, wo: jax.Array, wi_gate: jax.Array | None,
        activation: str) -> jax.Array:
  """One expert: <f>[..., d] -> <f>[..., d]. relu: wo(relu(wi x)); silu: wo(silu(wg x) * wi x)."""
  h = activate(jnp.dot(x, wi), lambda: jnp.dot(x, wi_gate), activation)
  return jnp.dot(h.astype(wo.dtype), wo)


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
  h = activate(jnp.einsum("gcd,gdf->gcf", x, weights["wi"]),
               lambda: jnp.einsum("gcd,gdf->gcf", x, weights["wi_gate"]), activation)
  return jnp.einsum("gcf,gfd->gcd", h.astype(x.dtype), weights["wo"])


def segments(group_sizes, weight_segments):
  """Yields (sizes, weights, offset) per weight segment.

  Segment i owns the next `len(weights["wi"])` entries of `group_sizes`, and its rows start at
  `offset`, right after segment i - 1's rows (0, a Python int, for the first). Reading each
  segment in place avoids concatenating their weights (a copy of every expert's weights per
  call)."""
  first, offset = 0, 0
  for weights in weight_segments:
    count = weights["wi"].shape[0]
    sizes = group_sizes[first:first + count]
    yield sizes, weights, offset
    first, offset = first + count, offset + jnp.sum(sizes)


def per_segment(group_sizes, weight_segments, run):
  """Sum over weight segments of `run(sizes, weights, offset)` -> <f>[R, d]; `run` must return
  zeros outside its segment's rows."""
  parts = [run(*segment) for segment in segments(group_sizes, weight_segments)]
  return sum(parts[1:], parts[0])


def ragged_dot_at(x, group_sizes, weights, offset, activation):
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
  h = activate(jax.lax.ragged_dot(x, weights["wi"], group_sizes),
               lambda: jax.lax.ragged_dot(x, weights["wi_gate"], group_sizes), activation)
  return jax.lax.ragged_dot(h.astype(x.dtype), weights["wo"], group_sizes)


def dense_ffn(x, group_sizes, weights, activation):
  ends = jnp.cumsum(group_sizes)
  group_of_row = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")
  y = jnp.zeros_like(x)
  for g in range(group_sizes.shape[0]):
    y_g = ffn(x, weights["wi"][g], weights["wo"][g], _gate(weights, g), activation)
    y = jnp.where((group_of_row == g)[:, None], y_g, y)
  return y


def _gate(weights, g):
  return weights["wi_gate"][g] if "wi_gate" in weights else None
