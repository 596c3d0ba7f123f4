"""A minimal stack of residual MoE blocks: the smallest model the stack runner can drive.

Block l:  h = h + relu(rms(h) @ mix_l)          (a dense token-wise sublayer)
          h = h + MoE_l(rms(h) * norm_l)        (through the `moe_fn` hook)
Used by tests, benchmarks and examples; model families expose the same `moe_fn` hook.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax import moe_layer
from moe_jax.config import MoEConfig
from moe_jax.models.common import rms_norm

STACK = "stack"


def init(key: jax.Array, cfg: MoEConfig, num_layers: int) -> dict:
  keys = jax.random.split(key, 2 * num_layers)
  layers = []
  for l in range(num_layers):
    layers.append({
        "mix": jax.random.normal(keys[2 * l], (cfg.d_model, cfg.d_model)) * cfg.d_model ** -0.5,
        "norm": jnp.ones((cfg.d_model,)),
        "moe": moe_layer.init_moe_params(keys[2 * l + 1], cfg),
    })
  return {"layers": layers}


def moe_layers(params: dict) -> dict:
  """The stack-runner view: stack name -> MoE params in order."""
  return {STACK: [layer["moe"] for layer in params["layers"]]}


def forward(params: dict, h: jax.Array, moe_fn) -> tuple[jax.Array, list]:
  """h <f>[B, L, d] through every block; `moe_fn(stack, index, moe_params, x, routing)`.

  Returns:
    (h, list of each layer's MoEStats).
  """
  all_stats = []
  for index, layer in enumerate(params["layers"]):
    h = h + jax.nn.relu(rms_norm(h) @ layer["mix"])
    y, stats = moe_fn(STACK, index, layer["moe"], rms_norm(h) * layer["norm"], None)
    h = h + y
    all_stats.append(stats)
  return h, all_stats
