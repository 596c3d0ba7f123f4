"""Bad input fails at the boundary with a ValueError that names the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_jax
from moe_jax import replication


def _cfg(**kw):
  base = dict(num_experts=8, d_model=16, d_ff=32)
  base.update(kw)
  return moe_jax.MoEConfig(**base)


def _place(num_replica_slots):
  return moe_jax.place(jnp.ones((8,)), _cfg(), num_replica_slots=num_replica_slots,
                       mesh=moe_jax.make_mesh(1, 4))


# What the layer is (MoEConfig), how a run executes it (ExecutionConfig), and how many replica
# slots replication gives it (ReplicationConfig, or `place` directly): each rule fails where the
# value is given, naming the field.
@pytest.mark.parametrize("make,kwargs,match", [
    (_cfg, dict(top_k=9), "MoEConfig.top_k=9 exceeds num_experts=8"),
    (_cfg, dict(activation="gelu"), "MoEConfig.activation='gelu' is not one of"),
    (_cfg, dict(num_experts=0), "MoEConfig.num_experts must be a positive int"),
    (_cfg, dict(dtype="float31"), "is not a dtype"),
    (moe_jax.ExecutionConfig, dict(capacity_factor=0.0),
     "ExecutionConfig.capacity_factor must be > 0"),
    (moe_jax.ExecutionConfig, dict(capacity_factor=-1.0),
     "ExecutionConfig.capacity_factor must be > 0"),
    (moe_jax.ExecutionConfig, dict(capacity_mode="sometimes"),
     "ExecutionConfig.capacity_mode='sometimes' is not one of"),
    (moe_jax.ExecutionConfig, dict(gmm_backend="magic"),
     "ExecutionConfig.gmm_backend='magic' is not one of"),
    (moe_jax.ExecutionConfig, dict(all_to_all="sometimes"),
     "ExecutionConfig.all_to_all='sometimes' is not one of"),
    (moe_jax.ExecutionConfig, dict(num_chunks=0), "ExecutionConfig.num_chunks must be a positive"),
    (moe_jax.ExecutionConfig, dict(capacity=0), "ExecutionConfig.capacity must be None or a pos"),
    (replication.ReplicationConfig, dict(num_replica_slots=-1),
     "num_replica_slots=-1 must be an int >= 0"),
    (replication.ReplicationConfig, dict(num_replica_slots=True),
     "num_replica_slots=True must be an int >= 0"),
    (_place, dict(num_replica_slots=-1), "num_replica_slots must be an int >= 0"),
])
def test_bad_config(make, kwargs, match):
  with pytest.raises(ValueError, match=match):
    make(**kwargs)


@pytest.mark.parametrize("shape", [(2, 2), (4,), (8, 1)])
def test_replica_columns_of_the_wrong_shape(shape):
  """Replica columns are <int32>[De, r]: one row per expert-axis device, any r."""
  cfg = _cfg()
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match=r"replica columns have shape \(.*\), expected \(4, r\)"):
    moe_jax.prefetch(params, -np.ones(shape, np.int32), cfg, mesh=moe_jax.make_mesh(1, 4))


@pytest.mark.parametrize("columns,match", [
    ([[9], [-1], [-1], [-1]], r"replica column \[0, 0\] = 9 is out of range"),
    ([[-1], [-1], [-3], [-1]], r"replica column \[2, 0\] = -3 is out of range"),
    ([[2, 2], [-1, -1], [-1, -1], [-1, -1]],
     r"replica column \[0, 1\] holds expert 2, which device 0 already holds in another replica"),
    ([[1], [-1], [-1], [-1]], r"holds expert 1, which device 0 already holds in a home slot"),
    ([[0, 1, 2], [2, 3, 0], [4, 5, 1], [6, 7, 2]], "looks like a full slot table"),
    ([[0.5], [-1], [-1], [-1]], "must hold integers"),
])
def test_bad_replica_columns(columns, match):
  cfg = _cfg()
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match=match):
    moe_jax.prefetch(params, np.asarray(columns), cfg, mesh=moe_jax.make_mesh(1, 4))


def test_full_slot_tables_are_read_only_when_concrete_and_checked():
  cfg = _cfg()
  mesh = moe_jax.make_mesh(1, 4)
  table = np.array([[0, 1, 4], [2, 3, 0], [4, 5, 1], [6, 7, 2]], np.int32)
  np.testing.assert_array_equal(moe_jax.replica_columns(table, cfg, mesh=mesh), table[:, 2:])
  with pytest.raises(ValueError, match=r"home column changed: slot \[1, 0\] holds expert 5"):
    moe_jax.replica_columns(_with(table, (1, 0), 5), cfg, mesh=mesh)
  with pytest.raises(ValueError, match="needs a concrete slot table"):
    jax.jit(lambda t: moe_jax.replica_columns(t, cfg, mesh=mesh))(table)


def _with(array, index, value):
  array = array.copy()
  array[index] = value
  return array


def test_replicas_that_do_not_match_the_layer():
  cfg = _cfg()
  mesh = moe_jax.make_mesh(1, 4)
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  x = jnp.zeros((2, 4, 16))
  held = moe_jax.prefetch(params, moe_jax.place(jnp.arange(8.0), cfg, num_replica_slots=2,
                                                mesh=mesh), cfg, mesh=mesh)
  one_slot = moe_jax.prefetch(params, moe_jax.place(jnp.arange(8.0), cfg, num_replica_slots=1,
                                                    mesh=mesh), cfg, mesh=mesh)
  with pytest.raises(ValueError, match=r"replicas.weights\['wi'\] has shape \(4, 16, 32\), "
                     r"expected \(8, 16, 32\)"):
    moe_jax.moe_apply(params, x, cfg, mesh=mesh, replicas=held.replace(weights=one_slot.weights))
  other = moe_jax.init_moe_params(jax.random.key(0), _cfg(num_experts=16))
  with pytest.raises(ValueError, match="replicas are for num_experts=16, but the layer has 8"):
    moe_jax.moe_apply(params, x, cfg, mesh=mesh,
                      replicas=moe_jax.empty_replicas(other, 2, mesh=mesh))
  with pytest.raises(ValueError, match=r"replica columns have shape \(4, 1\), expected \(4, 2\)"):
    moe_jax.refresh(params, one_slot.columns, held, cfg, mesh=mesh)


def test_experts_not_divisible_by_expert_axis():
  cfg = _cfg(num_experts=6)
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by the mesh's expert axis"):
    moe_jax.moe_apply(params, jnp.zeros((2, 4, 16)), cfg, mesh=moe_jax.make_mesh(1, 4))


@pytest.mark.parametrize("shape", [(8, 16), (2, 4, 15), (1, 2, 4, 16)])
def test_wrong_rank_or_width(shape):
  cfg = _cfg()
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match=r"x must be \[batch, length, d_model=16\]"):
    moe_jax.moe_apply(params, jnp.zeros(shape), cfg)


def test_batch_not_divisible_by_data_axis():
  cfg = _cfg()
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="batch 3 is not divisible by the mesh's data axis"):
    moe_jax.moe_apply(params, jnp.zeros((3, 4, 16)), cfg, mesh=moe_jax.make_mesh(2, 4))


def test_params_from_another_config():
  params = moe_jax.init_moe_params(jax.random.key(0), _cfg(d_ff=64))
  with pytest.raises(ValueError, match=r"params\['wi'\] has shape \(8, 16, 64\), expected"):
    moe_jax.moe_apply(params, jnp.zeros((2, 4, 16)), _cfg())
  with pytest.raises(ValueError, match="lack 'wi_gate'"):
    moe_jax.moe_apply(params, jnp.zeros((2, 4, 16)), _cfg(d_ff=64, activation="silu"))


def test_mesh_larger_than_devices():
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
    moe_jax.make_mesh(2, 8)
