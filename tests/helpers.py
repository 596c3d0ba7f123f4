"""Shared test fixtures: skewed MoE parameters and inputs."""

import jax
import jax.numpy as jnp
import numpy as np

import moe_jax

MESHES = [(1, 1), (1, 8), (2, 4), (4, 2), (8, 1)]


def skewed_params(cfg: moe_jax.MoEConfig, seed: int = 0, skew: float = 0.5):
  """Params whose router prefers low expert ids strongly (Zipf-like loads) for `skewed_tokens`."""
  params = moe_jax.init_moe_params(jax.random.key(seed), cfg)
  direction = np.zeros((cfg.d_model,), np.float32)
  direction[0] = 1.0
  preference = skew / (np.arange(cfg.num_experts) + 1.0)
  router = np.asarray(params["router"]) * 0.5 + direction[:, None] * preference[None, :]
  params["router"] = jnp.asarray(router)
  return params


def skewed_tokens(cfg: moe_jax.MoEConfig, batch: int, length: int, seed: int = 1):
  """<f32>[B, L, d] tokens with a shared positive component along the router's skew direction."""
  x = np.array(jax.random.normal(jax.random.key(seed), (batch, length, cfg.d_model)))
  x[..., 0] += 1.0
  return jnp.asarray(x, cfg.jnp_dtype)


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
