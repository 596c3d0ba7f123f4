"""The grouped matmul over rows sorted by slot: one signature, a table of backends.

* "ragged_dot": `jax.lax.ragged_dot`, the right primitive on GPU/TPU (`experts.ragged_dot_at`).
* "windowed": the CPU path (`experts_cpu.windowed_ffn`): XLA:CPU lowers `ragged_dot` to about one
  dense matmul per group, so it walks row windows of one group each instead; its reverse-mode
  derivative is a `custom_vjp` walking the same windows (`gmm_vjp`).
* "dense": every group's FFN over every row, masked: the slow, obvious reference.

Every backend is differentiable (`jax.grad`), with a grouped backward except "dense": "ragged_dot"
through JAX's own transpose rules of `ragged_dot` (dX by a ragged_dot with W^T, dW by a ragged
contraction over the same group sizes).

All backends return zeros for rows past `sum(group_sizes)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax import experts
from moe_jax import experts_cpu
from moe_jax import gmm_vjp


def _ragged_dot(x, group_sizes, weight_segments, activation, **unused):
  del unused
  return experts.per_segment(group_sizes, weight_segments, lambda sizes, w, offset: (
      experts.ragged_dot_at(x, sizes, w, offset, activation)))


def _dense(x, group_sizes, weight_segments, activation, **unused):
  del unused
  return experts.dense_ffn(x, group_sizes, experts.concat_segments(weight_segments), activation)


BACKENDS = {
    "ragged_dot": _ragged_dot,
    "windowed": gmm_vjp.windowed_ffn,
    "dense": _dense,
}


def default_backend() -> str:
  """'windowed' on CPU, 'ragged_dot' on GPU/TPU."""
  return "windowed" if jax.default_backend() == "cpu" else "ragged_dot"


def grouped_ffn(x: jax.Array, group_sizes: jax.Array, weights, *, activation: str,
                backend: str = "auto", window: int = experts_cpu.WINDOW_ROWS,
                tail_window: int = experts_cpu.TAIL_WINDOW_ROWS,
                bulk: bool | None = None) -> jax.Array:
  """Runs rows sorted by group through their group's FFN.

  Args:
    x: <f>[R, d] rows sorted by group; rows past sum(group_sizes) are padding.
    group_sizes: <int32>[G] rows per group.
    weights: {"wi": <f>[G, d, f], "wo": <f>[G, f, d]} (+ "wi_gate": <f>[G, d, f] for silu), or
      a sequence of such dicts whose group counts add up to G (e.g. a device's home experts,
      then its replica slots): segment i's groups follow segment i - 1's. "windowed" and
      "ragged_dot" read each segment in place (one call per segment); "dense" concatenates.
    activation: "relu" or "silu".
    backend: "auto" or a key of `BACKENDS`.
    window, tail_window: windowed backend row tiles (keyword-only tuning knobs): whole windows
      of `window` rows, and remainders in one masked window of `tail_window * 2**k` rows.
    bulk: windowed backend: None lets `experts_cpu.bulk_pays` decide per call whether the
      batched pass runs; True / False force it on / off (for tests and benchmarks).

  Returns:
    <f>[R, d]; zeros in padding rows.
  """
  if backend == "auto":
    backend = default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"unknown grouped-matmul backend {backend!r}; use 'auto' or one of "
                     f"{sorted(BACKENDS)}.")
  weight_segments = [weights] if isinstance(weights, dict) else list(weights)
  weight_segments = gmm_vjp.vary_like(weight_segments, x)   # one gradient reduction per weight
  y = BACKENDS[backend](x, group_sizes.astype(jnp.int32), weight_segments, activation,
                        window=window, tail_window=tail_window, bulk=bulk)
  return y.astype(x.dtype)   # every backend leaves rows past sum(group_sizes) zero
