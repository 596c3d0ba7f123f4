"""Bad input fails at the boundary with a ValueError that names the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_jax


def _cfg(**kw):
  base = dict(num_experts=8, d_model=16, d_ff=32)
  base.update(kw)
  return moe_jax.MoEConfig(**base)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(capacity_factor=-1.0), "capacity_factor must be > 0"),
    (dict(dispatch="sometimes"), "dispatch='sometimes' is not one of"),
    (dict(activation="gelu"), "activation='gelu' is not one of"),
    (dict(num_experts=0), "num_experts must be a positive int"),
    (dict(num_replica_slots=-1), "num_replica_slots must be an int >= 0"),
    (dict(dtype="float31"), "is not a dtype"),
])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _cfg(**kwargs)


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
