"""Replica slots: outputs never change in dropless mode, capacity drops fall, balance improves;
replica weights travel with the columns they were fetched for, and bad columns fail loudly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import moe_jax
from moe_jax import placement, reference
from tests import helpers

B, L = 4, 16


def _setup(num_experts, top_k, mesh_shape, capacity_mode="dropless", all_to_all="auto"):
  """(cfg, execution, params, x, mesh, apply); apply(params, x, columns) fetches the replicas of
  the replica columns <int32>[De, r] and runs the layer, in one jitted program."""
  cfg = moe_jax.MoEConfig(num_experts=num_experts, top_k=top_k, d_model=16, d_ff=32)
  execution = moe_jax.ExecutionConfig(capacity_mode=capacity_mode, capacity_factor=1.0,
                                      all_to_all=all_to_all)
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, B, L)
  mesh = moe_jax.make_mesh(*mesh_shape)

  @jax.jit
  def apply(p, x, columns):
    held = moe_jax.prefetch(p, columns, cfg, mesh=mesh, execution=execution)
    return moe_jax.moe_apply(p, x, cfg, execution=execution, mesh=mesh, replicas=held)
  return cfg, execution, params, x, mesh, apply


def _columns(kind, rng, cfg, r, mesh, load):
  e, d = cfg.num_experts, mesh.shape["expert"]
  if kind == "empty":
    return -np.ones((d, r), np.int32)
  if kind == "random":
    return helpers.random_columns(rng, e, d, r)
  if kind == "oracle":
    return np.asarray(moe_jax.place(load, cfg, num_replica_slots=r, mesh=mesh))
  if kind == "adversarial":  # every replica slot to the coldest experts
    return np.asarray(moe_jax.place(jnp.max(load) - load + 1.0, cfg, num_replica_slots=r,
                                    mesh=mesh))
  raise ValueError(kind)


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4), (4, 2)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_output_is_independent_of_the_placement(mesh_shape, top_k):
  cfg, _, params, x, mesh, apply = _setup(16, top_k, mesh_shape)
  y0, s0 = apply(params, x, -np.ones((mesh_shape[1], 2), np.int32))
  load = s0.tokens_per_expert.astype(jnp.float32)
  for seed in range(6):
    for kind in ("empty", "random", "oracle", "adversarial"):
      columns = _columns(kind, np.random.default_rng(seed), cfg, 2, mesh, load)
      assert columns.shape == (mesh_shape[1], 2), kind
      y, s = apply(params, x, jnp.asarray(columns))
      assert helpers.rel_err(y, y0) <= 1e-6, (kind, seed)
      assert int(s.dropped_choices) == 0
      assert int(np.sum(s.tokens_per_slot)) == B * L * top_k


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), fill=st.floats(0.0, 1.0))
def test_property_any_valid_placement_is_exact(seed, fill):
  cfg, _, params, x, mesh, apply = _CACHED_SETUP
  y0, _ = apply(params, x, -np.ones((4, 3), np.int32))
  columns = helpers.random_columns(np.random.default_rng(seed), 16, 4, 3, fill=fill)
  y, _ = apply(params, x, jnp.asarray(columns))
  assert helpers.rel_err(y, y0) <= 1e-6


_CACHED_SETUP = _setup(16, 2, (2, 4))


@pytest.mark.parametrize("all_to_all", ["padded", "emulated_ragged"])
def test_prefetch_fetches_the_named_experts(all_to_all):
  """Replicas fetched on their own (hoisted) hold their columns' home weights, and give what a
  fetch inside the layer's jitted program gives."""
  cfg, execution, params, x, mesh, apply = _setup(8, 2, (2, 4), all_to_all=all_to_all)
  columns = jnp.asarray(helpers.random_columns(np.random.default_rng(3), 8, 4, 2, fill=0.7))
  held = moe_jax.prefetch(params, columns, cfg, mesh=mesh, execution=execution)
  assert isinstance(held, moe_jax.Replicas) and held.num_replica_slots == 2
  np.testing.assert_array_equal(held.columns, columns)
  np.testing.assert_array_equal(held.slot_table[:, :2], moe_jax.home_slot_table(8, 4))
  for name in ("wi", "wo"):
    got = np.asarray(held.weights[name]).reshape((4, 2) + params[name].shape[1:])
    for dev in range(4):
      for c in range(2):
        e = int(columns[dev, c])
        want = np.asarray(params[name][e]) if e >= 0 else np.zeros(params[name].shape[1:])
        np.testing.assert_array_equal(got[dev, c], want)
  y_inline, _ = apply(params, x, columns)
  y_hoisted, _ = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh, replicas=held)
  assert helpers.rel_err(y_hoisted, y_inline) <= 1e-6


@pytest.mark.parametrize("all_to_all", ["padded", "emulated_ragged"])
def test_refresh_equals_a_fresh_prefetch_of_the_new_columns(all_to_all):
  """Resident replicas of one placement refreshed to another hold exactly what a prefetch of the
  new columns holds, on both exchange paths (per-column conds, and one ragged fetch)."""
  cfg, execution, params, _, mesh, _ = _setup(8, 2, (2, 4), all_to_all=all_to_all)
  old = jnp.array([[4, 6], [0, 5], [1, -1], [2, 3]], jnp.int32)
  new = jnp.array([[4, 7], [0, 5], [-1, 0], [2, 3]], jnp.int32)
  held = moe_jax.prefetch(params, old, cfg, mesh=mesh, execution=execution)
  got, fetched_bytes = moe_jax.refresh(params, new, held, cfg, mesh=mesh, execution=execution)
  want = moe_jax.prefetch(params, new, cfg, mesh=mesh, execution=execution)
  np.testing.assert_array_equal(got.columns, new)
  for name in want.weights:
    np.testing.assert_array_equal(got.weights[name], want.weights[name])
  per_expert = sum(params[k][0].nbytes for k in want.weights)   # 2 slots fetched, 1 cleared
  assert float(fetched_bytes) == 2 * per_expert * mesh.shape["data"]


_T1 = np.array([[0, 1, 4, 6], [2, 3, 0, 5], [4, 5, 1, -1], [6, 7, 2, 3]], np.int32)
_T2 = np.array([[0, 1, 2, 3], [2, 3, 0, 1], [4, 5, 0, 1], [6, 7, 0, 1]], np.int32)


def test_replica_weights_cannot_be_paired_with_another_table():
  """Probe (a): `moe_apply(slot_table=T2, replica_weights=prefetch(T1))` ran silently, outputs off
  by up to 1.32. Weights now travel in one `Replicas` with the columns they were fetched for:
  there is no argument that takes weights and a table apart."""
  cfg, _, params, x, mesh, _ = _setup(8, 2, (2, 4))
  y0, _ = moe_jax.moe_apply(params, x, cfg, mesh=mesh)
  held = moe_jax.prefetch(params, moe_jax.replica_columns(_T1, cfg, mesh=mesh), cfg, mesh=mesh)
  np.testing.assert_array_equal(held.slot_table, _T1)
  with pytest.raises(TypeError, match="slot_table"):
    moe_jax.moe_apply(params, x, cfg, mesh=mesh, slot_table=_T2, replica_weights=held.weights)
  with pytest.raises(ValueError, match="replicas must be a moe_jax.Replicas"):
    moe_jax.moe_apply(params, x, cfg, mesh=mesh, replicas=held.weights)
  y, stats = moe_jax.moe_apply(params, x, cfg, mesh=mesh, replicas=held)
  assert helpers.rel_err(y, y0) <= 1e-6
  assert int(np.sum(stats.tokens_per_slot[..., 2:])) > 0, "the replica slots computed nothing"
  moved, _ = moe_jax.refresh(params, moe_jax.replica_columns(_T2, cfg, mesh=mesh), held, cfg,
                             mesh=mesh)
  np.testing.assert_array_equal(moved.slot_table, _T2)
  y2, stats2 = moe_jax.moe_apply(params, x, cfg, mesh=mesh, replicas=moved)
  assert helpers.rel_err(y2, y0) <= 1e-6
  assert int(np.sum(stats2.tokens_per_slot[..., 2:])) > 0


# Replica columns that are not a placement: a full table passed as columns (its home experts
# again), an expert twice on a device, a device's own home expert, ids out of range.
_BAD_COLUMNS = {
    "full table": _T1,
    "twice": np.array([[4, 4], [0, 5], [1, -1], [2, 3]], np.int32),
    "own home": np.array([[1, 6], [0, 5], [1, -1], [2, 3]], np.int32),
    "too large": np.array([[8, 6], [0, 5], [1, -1], [2, 3]], np.int32),
    "below -1": np.array([[4, 6], [0, 5], [1, -2], [2, 3]], np.int32),
}


@pytest.mark.parametrize("all_to_all", ["padded", "emulated_ragged"])
def test_under_jit_home_columns_are_fixed_and_bad_columns_fail_loudly(all_to_all):
  """Probe (b): under jit a table whose home columns were changed ran silently (off by 1.32).
  Now a caller hands over replica columns only; a full table is read only when concrete, and
  checked. Bad columns are a ValueError when concrete and NaN outputs under jit, through
  `prefetch` and `refresh` alike; valid columns give the unreplicated answer."""
  cfg, execution, params, x, mesh, apply = _setup(8, 2, (2, 4), all_to_all=all_to_all)
  y0, _ = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh)
  tampered = _T1.copy()
  tampered[0, :2] = [1, 0]
  with pytest.raises(ValueError, match="home column changed"):
    moe_jax.replica_columns(tampered, cfg, mesh=mesh)
  with pytest.raises(ValueError, match="needs a concrete slot table"):
    jax.jit(lambda t: moe_jax.replica_columns(t, cfg, mesh=mesh))(tampered)

  @jax.jit
  def refreshed(p, x, new):
    held = moe_jax.prefetch(p, _T1[:, 2:], cfg, mesh=mesh, execution=execution)
    held, _ = moe_jax.refresh(p, new, held, cfg, mesh=mesh, execution=execution)
    return moe_jax.moe_apply(p, x, cfg, execution=execution, mesh=mesh, replicas=held)[0]

  for name, bad in _BAD_COLUMNS.items():
    with pytest.raises(ValueError, match="replica column"):
      moe_jax.prefetch(params, bad, cfg, mesh=mesh, execution=execution)
    assert np.all(np.isnan(apply(params, x, bad)[0])), name
    if bad.shape[1] == 2:
      held = moe_jax.prefetch(params, _T1[:, 2:], cfg, mesh=mesh, execution=execution)
      with pytest.raises(ValueError, match="replica column"):
        moe_jax.refresh(params, bad, held, cfg, mesh=mesh, execution=execution)
      assert np.all(np.isnan(refreshed(params, x, bad))), name
  for good in (_T1[:, 2:], _T2[:, 2:], np.array([[2, 7], [4, 6], [0, 3], [1, 5]], np.int32)):
    assert helpers.rel_err(apply(params, x, good)[0], y0) <= 1e-6
    assert helpers.rel_err(refreshed(params, x, good), y0) <= 1e-6


def test_capacity_drops_fall_with_oracle_placement():
  tokens, e = 512, 16
  routing = helpers.zipf_routing(tokens, e, 1, s=1.2, seed=1)
  cfg = moe_jax.MoEConfig(num_experts=e, d_model=16, d_ff=32)
  execution = moe_jax.ExecutionConfig(capacity_mode="capacity", capacity_factor=1.25)
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  x = jax.random.normal(jax.random.key(1), (8, tokens // 8, 16))
  mesh = moe_jax.make_mesh(1, 8)
  load = routing.tokens_per_expert.astype(jnp.float32)
  none, s_none = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh,
                                   routing=routing)
  held = moe_jax.prefetch(params, moe_jax.place(load, cfg, num_replica_slots=2, mesh=mesh), cfg,
                          mesh=mesh)
  y, s_oracle = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh,
                                  routing=routing, replicas=held)
  assert int(s_oracle.dropped_choices) < int(s_none.dropped_choices)
  # Exact drop rule with replicas: within each group, the first copies[e] * C choices survive.
  groups = reference.routing_groups(8, tokens // 8, 1, 8)
  copies = np.asarray(placement.copies_per_expert(held.slot_table, e))
  for stats, out, n in ((s_none, none, np.ones(e, int)), (s_oracle, y, copies)):
    keep = reference.capacity_keep(routing.expert_ids, routing.dispatch_mask, groups,
                                   capacity=execution.group_capacity(cfg, len(groups[0])),
                                   copies=n)
    assert int(stats.dropped_choices) == int((~keep).sum())
    want = reference.dense_moe(params, x.reshape(-1, 16), routing.expert_ids,
                               routing.combine_weights, keep, activation="relu")
    assert helpers.rel_err(out.reshape(-1, 16), want) <= 1e-5


def test_oracle_placement_balances_zipf_routing():
  tokens, e = 4096, 16
  routing = helpers.zipf_routing(tokens, e, 1, s=1.2, seed=2)
  cfg = moe_jax.MoEConfig(num_experts=e, d_model=8, d_ff=8)
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  x = jnp.zeros((8, tokens // 8, 8))
  mesh = moe_jax.make_mesh(1, 8)
  _, s_none = moe_jax.moe_apply(params, x, cfg, mesh=mesh, routing=routing)
  columns = moe_jax.place(routing.tokens_per_expert.astype(jnp.float32), cfg,
                          num_replica_slots=2, mesh=mesh)
  assert columns.shape == (8, 2)
  held = moe_jax.prefetch(params, columns, cfg, mesh=mesh)
  assert held.slot_table.shape == (8, 2 + 2)
  _, s_oracle = moe_jax.moe_apply(params, x, cfg, mesh=mesh, routing=routing, replicas=held)
  assert float(s_none.balancedness) < 0.5
  assert float(s_oracle.balancedness) >= 0.9
  assert float(s_oracle.replica_bytes) == np.sum(np.asarray(columns) >= 0) * 2 * 8 * 8 * 4


def test_prefetch_is_independent_of_the_layer_input():
  """The overlap precondition: the prefetch collectives read only the columns and home weights."""
  cfg, _, params, x, mesh, apply = _setup(8, 1, (2, 4))
  columns = moe_jax.place(jnp.arange(8.0), cfg, num_replica_slots=1, mesh=mesh)
  fn = jax.jit(lambda p, x, c: apply(p, x, c)[0])
  jaxpr = jax.make_jaxpr(fn)(params, x, columns)
  tokens, = [v for v in jaxpr.jaxpr.invars if tuple(v.aval.shape) == (B, L, 16)]
  found = []                                                # (eqn, depends on the tokens?)
  _collect_collectives(jaxpr.jaxpr, {tokens}, found)
  from_x = [e for e, tainted in found if tainted]
  independent = [e for e, tainted in found if not tainted]
  assert len(from_x) == 2, "dispatch + combine"
  assert len(independent) == 2, "one prefetch all-to-all per expert weight (wi, wo)"
  hlo = fn.lower(params, x, columns).compile().as_text()
  assert hlo.count("all-to-all(") + hlo.count("all-to-all-start(") >= 4


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    inner = getattr(value, "jaxpr", value)
    if hasattr(inner, "eqns"):
      yield inner


def _collect_collectives(jaxpr, tainted, found):
  """Walks `jaxpr` (and nested calls) propagating taint; records all_to_all eqns."""
  tainted = set(tainted)
  for eqn in jaxpr.eqns:
    hit = [type(v).__name__ != "Literal" and v in tainted for v in eqn.invars]
    if eqn.primitive.name == "all_to_all":
      found.append((eqn, any(hit)))
    out_tainted = any(hit)
    for inner in _sub_jaxprs(eqn):
      if len(inner.invars) == len(eqn.invars):
        inner_taint = {v for v, h in zip(inner.invars, hit) if h}
        out = _collect_collectives(inner, inner_taint, found)
        out_tainted = any(v in out for v in inner.outvars) or out_tainted
    if out_tainted:
      tainted.update(eqn.outvars)
  return tainted
