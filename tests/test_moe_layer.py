"""moe_apply against the dense oracle, over capacity modes, k, E and meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_jax
from moe_jax import reference
from tests import helpers


def _oracle(params, x, cfg, execution, stats, mesh_shape, token_mask=None, copies=None):
  batch, length, d = x.shape
  routing = stats.routing
  ids = np.asarray(routing.expert_ids)
  mask = np.asarray(routing.dispatch_mask)
  if token_mask is not None:
    mask = mask & np.asarray(token_mask).reshape(-1, 1)
  keep = mask
  if execution.capacity_mode == "capacity":
    groups = reference.routing_groups(batch, length, *mesh_shape)
    group_size = len(groups[0])
    copies = np.ones(cfg.num_experts, int) if copies is None else copies
    keep = reference.capacity_keep(ids, mask, groups,
                                   capacity=execution.group_capacity(cfg, group_size),
                                   copies=copies)
  y = reference.dense_moe(params, x.reshape(-1, d), ids, routing.combine_weights, keep,
                          activation=cfg.activation)
  return np.asarray(y).reshape(batch, length, d), int(mask.sum() - keep.sum())


@pytest.mark.parametrize("mesh_shape", helpers.MESHES)
@pytest.mark.parametrize("num_experts", [8, 16])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_mode", ["dropless", "capacity"])
def test_matches_dense_oracle(capacity_mode, top_k, num_experts, mesh_shape):
  cfg = moe_jax.MoEConfig(num_experts=num_experts, top_k=top_k, d_model=16, d_ff=32)
  execution = moe_jax.ExecutionConfig(capacity_mode=capacity_mode, capacity_factor=1.0)
  params = helpers.skewed_params(cfg)
  # 8 x 7 tokens: with 8 expert devices the data shard does not split evenly -> padding rows.
  x = helpers.skewed_tokens(cfg, 8, 7)
  mesh = moe_jax.make_mesh(*mesh_shape)
  y, stats = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh)
  want, want_dropped = _oracle(params, x, cfg, execution, stats, mesh_shape)
  assert helpers.rel_err(y, want) <= 1e-5
  assert int(stats.dropped_choices) == want_dropped
  assert int(stats.total_choices) == 8 * 7 * top_k
  assert int(np.sum(stats.tokens_per_device)) == 8 * 7 * top_k - want_dropped
  if capacity_mode == "capacity" and top_k == 1 and num_experts == 8:
    assert want_dropped > 0, "the skewed case should overflow capacity"


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
@pytest.mark.parametrize("capacity_mode", ["dropless", "capacity"])
def test_token_mask_padding_rows(capacity_mode, mesh_shape):
  cfg = moe_jax.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32, renormalize=True)
  execution = moe_jax.ExecutionConfig(capacity_mode=capacity_mode, capacity_factor=1.0)
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 4, 10)
  token_mask = np.ones((4, 10), bool)
  token_mask[:, 6:] = False      # padded tail of every sequence
  token_mask[3] = False          # and one all-padding row
  y, stats = moe_jax.moe_apply(params, x, cfg, execution=execution,
                               mesh=moe_jax.make_mesh(*mesh_shape),
                               token_mask=jnp.asarray(token_mask))
  want, want_dropped = _oracle(params, x, cfg, execution, stats, mesh_shape,
                               token_mask=token_mask)
  assert helpers.rel_err(y, want) <= 1e-5
  assert np.all(np.asarray(y)[~token_mask] == 0)
  assert int(stats.dropped_choices) == want_dropped
  assert int(stats.total_choices) == int(token_mask.sum()) * 2


@pytest.mark.parametrize("all_to_all", ["padded", "emulated_ragged"])
@pytest.mark.parametrize("gmm_backend", ["windowed", "dense", "ragged_dot"])
def test_exchange_and_backends_agree(all_to_all, gmm_backend):
  cfg = moe_jax.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32, activation="silu")
  execution = moe_jax.ExecutionConfig(all_to_all=all_to_all, gmm_backend=gmm_backend)
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 4, 16)
  y, stats = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=moe_jax.make_mesh(2, 4))
  want, _ = _oracle(params, x, cfg, execution, stats, (2, 4))
  assert helpers.rel_err(y, want) <= 1e-5


def test_stats_shapes_and_balance():
  cfg = moe_jax.MoEConfig(num_experts=16, d_model=16, d_ff=32)
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 8, 16)
  _, stats = moe_jax.moe_apply(params, x, cfg, mesh=moe_jax.make_mesh(2, 4))
  assert stats.tokens_per_expert.shape == (16,)
  assert stats.tokens_per_slot.shape == (2, 4, 4)
  assert stats.tokens_per_device.shape == (2, 4)
  per_device = np.asarray(stats.tokens_per_device, float)
  assert float(stats.balancedness) == pytest.approx(per_device.mean() / per_device.max())
  assert float(stats.balancedness) < 0.6, "skewed routing should leave the mesh unbalanced"
  # Expert e lives on device e // 4: summing the per-expert counts per device gives the same.
  by_device = np.asarray(stats.tokens_per_expert).reshape(4, 4).sum(1)
  np.testing.assert_array_equal(np.asarray(stats.tokens_per_device).sum(0), by_device)


def test_jit_and_bf16():
  cfg = moe_jax.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32, dtype="bfloat16")
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 4, 8)
  mesh = moe_jax.make_mesh(1, 8)
  y, _ = jax.jit(lambda p, x: moe_jax.moe_apply(p, x, cfg, mesh=mesh))(params, x)
  assert y.dtype == jnp.bfloat16
  f32 = cfg.replace(dtype="float32")
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  y32, _ = moe_jax.moe_apply(p32, x.astype(jnp.float32), f32, mesh=mesh)
  assert helpers.rel_err(y, y32) < 3e-2


@pytest.mark.parametrize("capacity_mode", ["dropless", "capacity"])
def test_num_chunks_gives_identical_outputs(capacity_mode):
  cfg = moe_jax.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32)
  execution = moe_jax.ExecutionConfig(capacity_mode=capacity_mode, capacity_factor=1.0)
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 4, 12)
  mesh = moe_jax.make_mesh(2, 4)
  columns = moe_jax.place(jnp.arange(8.0)[::-1], cfg, num_replica_slots=1, mesh=mesh)
  assert columns.shape == (4, 1), "r = 1 replica slot per device"

  def layer(p, x, e):
    held = moe_jax.prefetch(p, columns, cfg, mesh=mesh, execution=e)
    return moe_jax.moe_apply(p, x, cfg, execution=e, mesh=mesh, replicas=held)
  outputs = []
  for chunks in (1, 2, 4):
    fn = jax.jit(lambda p, x, e=execution.replace(num_chunks=chunks): layer(p, x, e))
    y, stats = fn(params, x)
    outputs.append((np.asarray(y), int(stats.dropped_choices), np.asarray(stats.tokens_per_slot)))
    a2a = str(jax.make_jaxpr(fn)(params, x)).count("all_to_all[")
    # Capacity chunks split the C = 2 buffer rows per slot, so at most 2 chunks there.
    expected = (chunks if capacity_mode == "dropless"
                else min(chunks, execution.group_capacity(cfg, 6)))
    assert a2a == 2 * expected + 2, "dispatch + combine per chunk, plus the prefetch of wi and wo"
  for y, dropped, per_slot in outputs[1:]:
    assert helpers.rel_err(y, outputs[0][0]) <= 1e-6
    assert dropped == outputs[0][1]
    np.testing.assert_array_equal(per_slot, outputs[0][2])


def test_no_replicas_means_no_replica_exchange():
  """r is the replicas' column count: without replicas (or with r = 0) the layer runs no replica
  prefetch, only its dispatch and combine all-to-alls."""
  cfg = moe_jax.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32)
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 4, 12)
  mesh = moe_jax.make_mesh(2, 4)
  no_slots = np.zeros((4, 0), np.int32)
  fn = lambda p, x, c: moe_jax.moe_apply(p, x, cfg, mesh=mesh, replicas=None if c is None else (
      moe_jax.prefetch(p, c, cfg, mesh=mesh)))
  for columns in (None, no_slots):
    assert str(jax.make_jaxpr(lambda p, x, c=columns: fn(p, x, c))(params, x)).count(
        "all_to_all[") == 2
  y_none, stats = fn(params, x, None)
  y_home, _ = fn(params, x, no_slots)
  np.testing.assert_array_equal(y_none, y_home)
  assert stats.tokens_per_slot.shape == (2, 4, 2)
