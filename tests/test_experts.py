"""Grouped-matmul backends against a per-row loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import experts


def _weights(g, d, f, gated, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  w = {"wi": jax.random.normal(ks[0], (g, d, f)) / d ** 0.5,
       "wo": jax.random.normal(ks[1], (g, f, d)) / f ** 0.5}
  if gated:
    w["wi_gate"] = jax.random.normal(ks[2], (g, d, f)) / d ** 0.5
  return w


def _per_row(x, sizes, w, activation):
  out = np.zeros_like(np.asarray(x))
  row = 0
  for g, n in enumerate(sizes):
    for r in range(row, row + n):
      gate = w["wi_gate"][g] if "wi_gate" in w else None
      out[r] = experts.ffn(x[r], w["wi"][g], w["wo"][g], gate, activation)
    row += n
  return out


@pytest.mark.parametrize("backend", ["windowed", "dense", "ragged_dot"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("sizes", [[5, 0, 70, 1, 0, 9], [0, 0, 0, 0, 0, 0], [140, 0, 0, 0, 0, 3]])
def test_grouped_ffn_matches_per_row(backend, activation, sizes):
  rows = 160  # more rows than sum(sizes): the rest is padding
  x = jax.random.normal(jax.random.key(3), (rows, 8))
  w = _weights(len(sizes), 8, 16, activation == "silu")
  got = experts.grouped_ffn(x, jnp.asarray(sizes), w, activation=activation, backend=backend,
                            window=32, tail_window=8)
  want = _per_row(x, sizes, w, activation)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[sum(sizes):] == 0)


def test_capacity_ffn_matches_loop():
  x = jax.random.normal(jax.random.key(4), (3, 5, 8))
  w = _weights(3, 8, 16, False)
  got = experts.capacity_ffn(x, w, activation="relu")
  for g in range(3):
    np.testing.assert_allclose(got[g], experts.ffn(x[g], w["wi"][g], w["wo"][g], None, "relu"),
                               rtol=1e-5, atol=1e-6)


def test_unknown_backend_names_choices():
  with pytest.raises(ValueError, match="windowed"):
    experts.grouped_ffn(jnp.zeros((4, 2)), jnp.asarray([4]), _weights(1, 2, 2, False),
                        activation="relu", backend="magic")
