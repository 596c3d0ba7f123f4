"""What gets lowered: the ragged collective on request, the padded fallback on CPU by default."""

import jax
import jax.numpy as jnp

import moe_jax
from tests import helpers


def _lowered_text(cfg, mesh, jaxpr=False):
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 4, 8)
  fn = jax.jit(lambda p, x: moe_jax.moe_apply(p, x, cfg, mesh=mesh)[0])
  if jaxpr:
    return str(jax.make_jaxpr(fn)(params, x))
  return fn.lower(params, x).as_text()


def test_ragged_all_to_all_is_lowered_when_selected():
  cfg = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=32, all_to_all="ragged",
                          gmm_backend="ragged_dot")
  mesh = moe_jax.make_mesh(2, 4)
  assert "ragged_all_to_all" in _lowered_text(cfg, mesh)
  # XLA:CPU's lowering expands ragged_dot into dense ops, so look for it one level up.
  assert "ragged_dot" in _lowered_text(cfg, mesh, jaxpr=True)


def test_cpu_default_uses_padded_all_to_all_and_no_ragged_ops():
  cfg = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=32)
  text = _lowered_text(cfg, moe_jax.make_mesh(2, 4))
  assert jax.default_backend() == "cpu"
  assert "all_to_all" in text
  assert "ragged_all_to_all" not in text
  assert "ragged_dot" not in _lowered_text(cfg, moe_jax.make_mesh(2, 4), jaxpr=True)
