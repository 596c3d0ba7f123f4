"""One-layer-ahead load predictors: hidden state entering MoE layer l -> load of MoE layer l'.

Every predictor returns a per-expert load estimate <f32>[E] for the next MoE layer. It is computed
from global (data-sharded) arrays with plain jnp reductions, so under jit XLA sums over the data
axis and every device sees the same estimate, hence the same placement.

Kinds:
  none     no estimate (no replicas are used);
  history  exponential moving average of past batches' true loads (what EPLB does);
  pregate  layer l' router applied to layer l's normalised hidden state (no training);
  learned  a small linear or low-rank map trained to predict l' routing from l's hidden state;
  oracle   l' true routing: an upper bound for benchmarks only, never for serving.

A prediction only decides where expert copies live; the real router still routes every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax import routing

KINDS = ("none", "history", "pregate", "learned", "oracle")


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"predictor {kind!r} is not one of {KINDS}.")
  return kind


def choice_counts(logits: jax.Array, top_k: int, token_mask: jax.Array | None = None) -> jax.Array:
  """<f32>[E] how many of the tokens' top-k choices under `logits` <f32>[T, E] fall on each expert."""
  _, ids = routing.select_top_k(logits, top_k)                              # [T, k]
  weight = jnp.ones(ids.shape, jnp.float32)
  if token_mask is not None:
    weight = weight * token_mask.reshape(-1, 1).astype(jnp.float32)
  return jnp.zeros((logits.shape[-1],), jnp.float32).at[ids.reshape(-1)].add(weight.reshape(-1))


def pregate_logits(x: jax.Array, next_router: jax.Array) -> jax.Array:
  """<f32>[T, E] layer l' router logits on layer l's normalised input x <f>[T, d]."""
  return jnp.dot(x.astype(jnp.float32), next_router.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def pregate_load(x, next_router, top_k: int, token_mask=None) -> jax.Array:
  return choice_counts(pregate_logits(x, next_router), top_k, token_mask)


# --- learned predictor ---------------------------------------------------------------------------


def init_learned(key: jax.Array, d_model: int, num_experts: int, rank: int | None = None,
                 next_router: jax.Array | None = None) -> dict:
  """Params of one layer-pair predictor: {"w": [d, E]} or low rank {"u": [d, r], "v": [r, E]},
  plus "b": [E]. Starting from the pregate map (when `next_router` is given) makes training a
  refinement of pregate rather than a cold start."""
  if rank is None:
    w = (next_router.astype(jnp.float32) if next_router is not None
         else jax.random.normal(key, (d_model, num_experts)) * d_model ** -0.5)
    return {"w": w, "b": jnp.zeros((num_experts,), jnp.float32)}
  ku, kv = jax.random.split(key)
  return {"u": jax.random.normal(ku, (d_model, rank)) * d_model ** -0.5,
          "v": jax.random.normal(kv, (rank, num_experts)) * rank ** -0.5,
          "b": jnp.zeros((num_experts,), jnp.float32)}


def learned_logits(params: dict, x: jax.Array) -> jax.Array:
  """<f32>[T, E] predicted layer-l' router logits from layer l's normalised input <f>[T, d]."""
  x = x.astype(jnp.float32)
  if "w" in params:
    return x @ params["w"] + params["b"]
  return (x @ params["u"]) @ params["v"] + params["b"]


def learned_load(params, x, top_k: int, token_mask=None) -> jax.Array:
  return choice_counts(learned_logits(params, x), top_k, token_mask)


# --- history -------------------------------------------------------------------------------------


def history_update(ema: jax.Array, true_load: jax.Array, decay: float) -> jax.Array:
  """EMA of per-expert loads; the first observation (ema == 0 everywhere) is taken as is."""
  true_load = true_load.astype(jnp.float32)
  fresh = jnp.all(ema == 0)
  return jnp.where(fresh, true_load, decay * ema + (1.0 - decay) * true_load)
