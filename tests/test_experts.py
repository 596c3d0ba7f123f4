"""Grouped-matmul backends against a per-row loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, experts, experts_cpu, grouped_matmul


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
  got = grouped_matmul.grouped_ffn(x, jnp.asarray(sizes), w, activation=activation,
                                   backend=backend, window=32, tail_window=8)
  want = _per_row(x, sizes, w, activation)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[sum(sizes):] == 0)


@pytest.mark.parametrize("backend,bulk,split", [
    ("windowed", None, 4), ("windowed", True, 1), ("windowed", False, 5), ("dense", None, 4),
    ("ragged_dot", None, 3)])
def test_weight_segments_match_one_weight_stack(backend, bulk, split):
  """Home experts then replica slots as two weight segments: the same rows as one stack; the
  windowed and ragged_dot backends read each segment in place (the segment boundary falls
  mid-window; ragged_dot rolls the second segment's rows, which start at a traced offset)."""
  sizes = [40, 0, 70, 1, 33, 9]
  x = jax.random.normal(jax.random.key(6), (160, 8))
  w = _weights(len(sizes), 8, 16, False, seed=2)
  segments = [{k: v[:split] for k, v in w.items()}, {k: v[split:] for k, v in w.items()}]
  tiling = dict(activation="relu", backend=backend, window=32, tail_window=8)
  if backend == "windowed":
    tiling["bulk"] = bulk
  got = grouped_matmul.grouped_ffn(x, jnp.asarray(sizes), segments, **tiling)
  np.testing.assert_allclose(got, _per_row(x, sizes, w, "relu"), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[sum(sizes):] == 0)


def test_capacity_ffn_segments_match_one_weight_stack():
  """The capacity path's per-segment einsums equal one einsum over the concatenated weights."""
  x = jax.random.normal(jax.random.key(7), (6, 5, 8))                      # [G, C, d]
  w = _weights(6, 8, 16, True, seed=4)
  segments = [{k: v[:4] for k, v in w.items()}, {k: v[4:] for k, v in w.items()}]
  np.testing.assert_allclose(experts.capacity_ffn(x, segments, activation="silu"),
                             experts.capacity_ffn(x, w, activation="silu"), rtol=1e-6, atol=1e-6)


WINDOWED_CASES = [
    # (rows, sizes, window, tail_window)
    (160, [5, 0, 70, 1, 0, 9], 32, 8),             # fewer valid rows than R / 2
    (160, [40, 0, 70, 1, 33, 9], 32, 8),           # most rows valid: several windows per group
    (8, [0, 1, 0, 3, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 1], 256, 64),   # decoding: R < G
    (300, [0, 290, 7], 64, 16),                    # 4 whole windows, then a masked 64-tile
    (200, [3, 17, 33, 70, 77], 32, 8),             # remainders in tiles 8, 32, 32 (whole+8)...
    (96, [12, 12, 12, 12, 12, 12, 12, 12], 256, 64),  # balanced: the batched pass covers all
    (64, [64], 32, 8),                             # one group
]


@pytest.mark.parametrize("bulk", [None, True, False])
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("case", WINDOWED_CASES)
def test_windowed_batched_pass_and_windows_match_per_row(case, activation, bulk):
  """The windowed backend with its batched pass forced on, off, or chosen by the cost model."""
  rows, sizes, window, tail_window = case
  x = jax.random.normal(jax.random.key(5), (rows, 8))
  w = _weights(len(sizes), 8, 16, activation == "silu", seed=1)
  got = grouped_matmul.grouped_ffn(x, jnp.asarray(sizes), w, activation=activation,
                                   backend="windowed", window=window, tail_window=tail_window,
                                   bulk=bulk)
  np.testing.assert_allclose(got, _per_row(x, sizes, w, activation), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[sum(sizes):] == 0)


def test_windowed_bfloat16_close_to_float32():
  sizes = [20, 3, 0, 41]
  x = jax.random.normal(jax.random.key(6), (64, 8))
  w = _weights(4, 8, 16, False, seed=2)
  want = _per_row(x, sizes, w, "relu")
  w16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), w)
  for bulk in (True, False):
    got = grouped_matmul.grouped_ffn(x.astype(jnp.bfloat16), jnp.asarray(sizes), w16,
                                     activation="relu", backend="windowed", bulk=bulk)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=5e-2, atol=5e-2)


def test_window_plan_shapes():
  plan = experts_cpu.window_plan(1024, 8)
  assert plan.bulk_rows >= 1024 // 8 and plan.bulk_rows % experts_cpu.MIN_TILE_ROWS == 0
  assert plan.tiles == (8, 16, 32, 64, 128, 256) and plan.window == 256
  assert experts_cpu.window_plan(100, 4, window=48, tail_window=16).tiles == (16, 32, 48)
  with pytest.raises(ValueError, match="window"):
    experts_cpu.window_plan(8, 2, window=0)


def test_windows_cost_counts_whole_windows_and_one_tile_per_remainder():
  plan = experts_cpu.window_plan(1024, 4)                       # window 256, tiles 8 ... 256
  rows = jnp.asarray([0, 5, 256, 300], jnp.int32)           # -, tile 8, 1 window, 1 window + 64
  want = (27 + 8) + (27 + 256) + (27 + 256) + (27 + 64)
  assert float(experts_cpu.windows_cost(rows, plan, weight_cost_rows=27)) == want


def test_bulk_pays_for_balanced_many_groups_not_for_few_rows():
  balanced = jnp.asarray([26, 38] * 16, jnp.int32)          # 1024 rows, 32 groups near 32 rows
  assert bool(experts_cpu.bulk_pays(balanced, experts_cpu.window_plan(1024, 32)))
  decoding = jnp.zeros((128,), jnp.int32).at[jnp.arange(8) * 16].set(1)   # 8 rows, 128 groups
  assert not bool(experts_cpu.bulk_pays(decoding, experts_cpu.window_plan(8, 128)))
  padded = balanced // 8                                    # a buffer 8x larger than the rows
  assert not bool(experts_cpu.bulk_pays(padded, experts_cpu.window_plan(8 * 1024, 32)))


def test_capacity_ffn_matches_loop():
  x = jax.random.normal(jax.random.key(4), (3, 5, 8))
  w = _weights(3, 8, 16, False)
  got = experts.capacity_ffn(x, w, activation="relu")
  for g in range(3):
    np.testing.assert_allclose(got[g], experts.ffn(x[g], w["wi"][g], w["wo"][g], None, "relu"),
                               rtol=1e-5, atol=1e-6)


def test_backend_table_matches_the_config_choices():
  assert set(grouped_matmul.BACKENDS) == set(config.GMM_BACKENDS) - {"auto"}
  assert grouped_matmul.default_backend() == "windowed"          # the tests run on CPU


def test_unknown_backend_names_choices():
  with pytest.raises(ValueError, match="windowed"):
    grouped_matmul.grouped_ffn(jnp.zeros((4, 2)), jnp.asarray([4]), _weights(1, 2, 2, False),
                               activation="relu", backend="magic")
