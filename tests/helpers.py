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


def zipf_routing(num_tokens: int, num_experts: int, top_k: int, s: float = 1.2, seed: int = 0):
  """A `Routing` whose choices follow Zipf(s) expert popularity (distinct experts per token)."""
  rng = np.random.default_rng(seed)
  popularity = 1.0 / np.arange(1, num_experts + 1) ** s
  popularity = popularity[rng.permutation(num_experts)]
  popularity = popularity / popularity.sum()
  ids = np.stack([rng.choice(num_experts, size=top_k, replace=False, p=popularity)
                  for _ in range(num_tokens)]).astype(np.int32)
  weights = rng.uniform(0.2, 1.0, size=(num_tokens, top_k)).astype(np.float32)
  logits = np.zeros((num_tokens, num_experts), np.float32)
  mask = np.ones((num_tokens, top_k), bool)
  return moe_jax.Routing(
      expert_ids=jnp.asarray(ids), combine_weights=jnp.asarray(weights),
      dispatch_mask=jnp.asarray(mask), logits=jnp.asarray(logits),
      probs=jax.nn.softmax(jnp.asarray(logits)), z_loss=jnp.zeros(()), aux_loss=jnp.zeros(()),
      tokens_per_expert=jnp.asarray(np.bincount(ids.ravel(), minlength=num_experts), jnp.int32))


def random_columns(rng, num_experts: int, num_devices: int, r: int, fill: float = 0.8):
  """Random valid replica columns <int32>[D, r] (each slot filled with probability `fill`)."""
  return random_slot_table(rng, num_experts, num_devices, r, fill)[:, num_experts // num_devices:]


def random_slot_table(rng, num_experts: int, num_devices: int, r: int, fill: float = 0.8):
  """A random valid slot table (each replica slot filled with probability `fill`)."""
  h = num_experts // num_devices
  table = -np.ones((num_devices, h + r), np.int32)
  table[:, :h] = np.arange(num_experts).reshape(num_devices, h)
  for dev in range(num_devices):
    candidates = [e for e in range(num_experts) if e // h != dev]
    chosen = rng.choice(candidates, size=min(r, len(candidates)), replace=False)
    for c, e in enumerate(chosen):
      if rng.random() < fill:
        table[dev, h + c] = e
  return table
