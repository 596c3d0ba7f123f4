"""A synthetic skewed workload for the MoE stack: routers with Zipf-like expert popularity and
batches whose "topic" drifts from step to step (so the load of a layer changes between batches).

  params = workload.skewed_stack(jax.random.key(0), cfg, num_layers=4, skew=0.5)
  x = workload.topic_batch(cfg, batch=8, length=256, step=3, topic_scale=0.5)

Every router is 0.5 * a random map + a shared direction (feature 0, which every token carries)
times skew / (rank + 1), where rank orders the experts by popularity: per layer a random
permutation (`permute=True`, hot experts differ between layers) or the identity (the low expert
ids are hot in every layer, so their home device is the straggler; as tests/helpers.py does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import MoEConfig
from moe_jax.models import moe_stack


def skewed_router(key: jax.Array, cfg: MoEConfig, *, skew: float, rank: np.ndarray) -> jax.Array:
  """<f32>[d, E] router preferring experts of low `rank` <int>[E] along feature 0."""
  random = jax.random.normal(key, (cfg.d_model, cfg.num_experts)) * cfg.d_model ** -0.5
  preference = skew / (np.asarray(rank, np.float32) + 1.0)
  direction = np.zeros((cfg.d_model,), np.float32)
  direction[0] = 1.0
  return 0.5 * random + jnp.asarray(direction[:, None] * preference[None, :])


def skewed_stack(key: jax.Array, cfg: MoEConfig, num_layers: int, *, skew: float = 0.5,
                 permute: bool = False, mix_scale: float = 1.0, seed: int = 0) -> dict:
  """`moe_stack` params whose every router is skewed (see the module docstring).

  `mix_scale` scales the dense sublayers: their relu outputs add a component shared by every
  token to the residual stream, which by itself concentrates routing on a few experts; a small
  scale leaves the skew to the routers.
  """
  params = moe_stack.init(key, cfg, num_layers)
  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.fold_in(key, 1), num_layers)
  for layer, layer_key in zip(params["layers"], keys):
    layer["mix"] = layer["mix"] * mix_scale
    rank = rng.permutation(cfg.num_experts) if permute else np.arange(cfg.num_experts)
    layer["moe"]["router"] = skewed_router(layer_key, cfg, skew=skew, rank=rank)
  return params


def topic_batch(cfg: MoEConfig, batch: int, length: int, step: int, *, topic_scale: float = 0.5,
                seed: int = 0) -> np.ndarray:
  """<f32>[B, L, d] tokens of step `step`: N(0, 1) + 1 on feature 0 + this step's topic vector.

  The topic (N(0, topic_scale^2) per feature, shared by the step's tokens) shifts every router's
  logits the same way for the whole batch, so expert loads drift from step to step.
  """
  rng = np.random.default_rng([seed, step])
  x = rng.standard_normal((batch, length, cfg.d_model)).astype(np.float32)
  x[..., 0] += 1.0
  x += topic_scale * rng.standard_normal((cfg.d_model,)).astype(np.float32)
  return x.astype(cfg.jnp_dtype)
