"""Top-k routers, computed in float32: each routing rule is one small pure function (`ROUTERS`).

The router is the only thing that decides which expert processes a token. Everything downstream
(replica placement, permutation, dispatch) may change *where* a token-choice is computed, never
*which* expert computes it or with what weight.

A router-stage rule (e.g. Hugging Face Switch's per-sequence `expert_capacity`) is expressed by
clearing entries of `Routing.dispatch_mask`; a cleared choice contributes 0 to the output.

A token whose router input row or router logits are not finite (NaN or inf) is routed to no
expert: top-k over NaN logits would pick an arbitrary one (argmax returns 0) and take a place in
its capacity from a clean token. Its dispatch mask is all False and it is left out of the losses
and loads; the layer makes its output NaN (`moe_layer.moe_apply`).
"""

from __future__ import annotations

import types
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Selection = tuple[Any, Any, Any]    # (weights <f32>[T, k], expert_ids <int>[T, k], scores [T, E])


@struct.dataclass
class Routing:
  """What the router decided for T tokens.

  Attributes:
    expert_ids: <int32>[T, k] chosen experts, best first (ties: lowest index).
    combine_weights: <f32>[T, k] weight of each choice in the output sum.
    dispatch_mask: <bool>[T, k] False for choices that must not be computed (padding tokens,
      non-finite tokens, or a router-stage capacity rule). Such choices contribute 0.
    logits: <f32>[T, E] raw router logits.
    probs: <f32>[T, E] the rule's per-expert scores: softmax of the logits (softmax rule) or their
      sigmoid (sigmoid rule).
    z_loss: <f32>[] mean over valid tokens of logsumexp(logits)^2 (valid: unmasked and finite).
    aux_loss: <f32>[] load-balancing loss E * sum_e f_e * P_e (f_e: fraction of valid token-choices
      routed to e; P_e: mean score (`probs`) of e over valid tokens), equal to Switch's for
      k = 1.
    tokens_per_expert: <int32>[E] dispatched token-choices per expert.
  """

  expert_ids: jax.Array
  combine_weights: jax.Array
  dispatch_mask: jax.Array
  logits: jax.Array
  probs: jax.Array
  z_loss: jax.Array
  aux_loss: jax.Array
  tokens_per_expert: jax.Array

  @property
  def num_experts(self) -> int:
    return self.logits.shape[-1]

  def with_dispatch_mask(self, dispatch_mask: jax.Array) -> "Routing":
    """The same routing with a (narrower) dispatch mask; counts follow the mask."""
    dispatch_mask = dispatch_mask & self.dispatch_mask
    counts = expert_counts(self.expert_ids, dispatch_mask, self.num_experts)
    return self.replace(dispatch_mask=dispatch_mask, tokens_per_expert=counts)


def expert_counts(expert_ids: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
  """<int32>[E] number of masked-in choices per expert."""
  return jnp.zeros((num_experts,), jnp.int32).at[expert_ids.reshape(-1)].add(
      mask.reshape(-1).astype(jnp.int32))


def finite_tokens(x: jax.Array, logits: jax.Array) -> jax.Array:
  """<bool>[T]: token t's router input row x[t] <f>[T, d] and logits[t] <f32>[T, E] are finite."""
  return jnp.all(jnp.isfinite(x), axis=-1) & jnp.all(jnp.isfinite(logits), axis=-1)


def select_top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(values, indices) <[..., k]> of the k largest entries along the last axis, largest first,
  ties to the lowest index: `lax.top_k`'s result.

  Written as a stable sort along the last axis: XLA's SPMD partitioner keeps a sort's other axes
  sharded, where it replicates `lax.top_k`'s operand (one all-gather of the whole [T, E] router
  output per call, a device-wide sync point, when the tokens are sharded)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
  negated, indices = jax.lax.sort((-values, iota), dimension=values.ndim - 1, is_stable=True,
                                  num_keys=1)
  return -negated[..., :k], indices[..., :k]


def softmax_rule(logits: jax.Array, bias: jax.Array | None, cfg) -> Selection:
  """Softmax over all E experts, the k most probable (Switch, Qwen, Mixtral, OLMoE).

  Weights are the chosen probabilities (renormalised to sum 1 iff `cfg.renormalize`)."""
  del bias
  probs = jax.nn.softmax(logits, axis=-1)
  weights, expert_ids = select_top_k(probs, cfg.top_k)                        # [T, k]
  if cfg.renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, expert_ids, probs


def sigmoid_rule(logits: jax.Array, bias: jax.Array | None, cfg) -> Selection:
  """DeepSeek-V3's router (also GLM-4-MoE's): sigmoid scores s; selection by s + bias.

  The E experts form `cfg.num_groups` contiguous groups; a group's score is the sum of its two
  best biased scores, and only the `cfg.top_groups` best groups are eligible. The k best eligible
  experts by biased score are chosen; their weights are the *unbiased* s (the bias steers
  selection only), divided by their sum (+1e-20) iff `cfg.renormalize`."""
  scores = jax.nn.sigmoid(logits)                                             # [T, E]
  biased = scores if bias is None else scores + bias.astype(jnp.float32)
  if cfg.num_groups > 1:
    grouped = biased.reshape(-1, cfg.num_groups, cfg.num_experts // cfg.num_groups)
    group_scores = jnp.sum(select_top_k(grouped, 2)[0], axis=-1)              # [T, G]
    _, best_groups = select_top_k(group_scores, cfg.top_groups)               # [T, top_groups]
    eligible = jnp.any(best_groups[..., None] == jnp.arange(cfg.num_groups), axis=-2)
    eligible = jnp.repeat(eligible, cfg.num_experts // cfg.num_groups, axis=-1)  # [T, E]
    biased = jnp.where(eligible, biased, -jnp.inf)
  _, expert_ids = select_top_k(biased, cfg.top_k)                             # [T, k]
  weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
  if cfg.renormalize:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights, expert_ids, scores


# name -> rule(logits <f32>[T, E], bias <f32>[E] or None, MoEConfig) -> (weights <f32>[T, k],
# expert_ids <int>[T, k], scores <f32>[T, E]). A new routing rule is one function here.
ROUTERS = {"softmax": softmax_rule, "sigmoid": sigmoid_rule}


def route(x: jax.Array, params: dict, cfg, *, token_mask: jax.Array | None = None) -> Routing:
  """Route T tokens by the layer's rule (`cfg.router`), in float32.

  Args:
    x: <float>[T, d] token representations (any float dtype; cast to float32 here).
    params: the layer's params: "router" <float>[d, E], optional "router_bias" <float>[E] (the
      sigmoid rule's selection-only bias; HF's e_score_correction_bias).
    cfg: the layer's `MoEConfig` (top_k, renormalize, router, groups, routed_scaling).
    token_mask: optional <bool>[T]; False marks padding tokens, which are not dispatched and do not
      count in the losses or loads. Tokens whose row of x or of the logits is not finite are
      treated the same way.

  Returns:
    A `Routing` whose weights include `cfg.routed_scaling`.
  """
  logits = router_logits(x, params["router"])
  weights, expert_ids, scores = ROUTERS[cfg.router](logits, params.get("router_bias"), cfg)
  if cfg.routed_scaling != 1.0:
    weights = weights * cfg.routed_scaling
  return _routing(x, logits, weights, expert_ids, scores, token_mask)


def with_experts(routing: Routing, expert_ids: jax.Array, cfg) -> Routing:
  """APPROXIMATE: `routing` with its choice replaced by `expert_ids` <int>[T, k] (e.g. a
  predictor's), as the source paper's approximate mode does. Each replacing choice is weighted
  by the rule's score of that expert (`routing.probs`), renormalised over the k iff
  `cfg.renormalize`, times `cfg.routed_scaling`; the dispatch mask (padding, non-finite tokens,
  a router-stage capacity rule) and the losses stay the router's. The layer then no longer
  computes the model's function: only for measuring what that costs.
  """
  expert_ids = jnp.asarray(expert_ids, jnp.int32).reshape(routing.expert_ids.shape)
  weights = jnp.take_along_axis(routing.probs, expert_ids, axis=-1)
  if cfg.renormalize:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  weights = weights * cfg.routed_scaling
  counts = expert_counts(expert_ids, routing.dispatch_mask, routing.num_experts)
  return routing.replace(expert_ids=expert_ids, combine_weights=weights,
                         tokens_per_expert=counts)


def router_logits(x: jax.Array, router_kernel: jax.Array) -> jax.Array:
  """<f32>[T, E] = x <float>[T, d] @ router_kernel <float>[d, E], in float32."""
  return jnp.dot(x.astype(jnp.float32), router_kernel.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)


def top_k_route(x: jax.Array, router_kernel: jax.Array, *, top_k: int, renormalize: bool = False,
                token_mask: jax.Array | None = None) -> Routing:
  """The softmax rule without a config: softmax over all experts, top-k (see `route`).

  Args:
    x: <float>[T, d] token representations (any float dtype; cast to float32 here).
    router_kernel: <float>[d, E] router projection.
    top_k: experts per token.
    renormalize: make the k chosen weights sum to 1 per token.
    token_mask: optional <bool>[T] (see `route`).
  """
  logits = router_logits(x, router_kernel)
  rule = types.SimpleNamespace(top_k=top_k, renormalize=renormalize)
  weights, expert_ids, probs = softmax_rule(logits, None, rule)
  return _routing(x, logits, weights, expert_ids, probs, token_mask)


def _routing(x, logits, weights, expert_ids, scores, token_mask) -> Routing:
  """The `Routing` of a rule's choice: validity, dispatch mask, losses and counts."""
  num_tokens, top_k = expert_ids.shape
  num_experts = logits.shape[-1]
  if token_mask is None:
    token_mask = jnp.ones((num_tokens,), bool)
  valid = token_mask & finite_tokens(x, logits)                              # [T]
  dispatch_mask = jnp.broadcast_to(valid[:, None], (num_tokens, top_k))
  num_valid = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  # Selects, not products: 0 * NaN would make a loss NaN.
  z_loss = jnp.sum(jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) ** 2, 0.0)) / num_valid
  counts = expert_counts(expert_ids, dispatch_mask, num_experts)
  fraction_routed = counts.astype(jnp.float32) / (num_valid * top_k)
  mean_prob = jnp.sum(jnp.where(valid[:, None], scores, 0.0), axis=0) / num_valid
  aux_loss = num_experts * jnp.sum(fraction_routed * mean_prob)
  return Routing(expert_ids=expert_ids.astype(jnp.int32), combine_weights=weights,
                 dispatch_mask=dispatch_mask, logits=logits, probs=scores, z_loss=z_loss,
                 aux_loss=aux_loss, tokens_per_expert=counts)


def sequence_capacity_mask(expert_ids: jax.Array, dispatch_mask: jax.Array,
                           num_experts: int, capacity: int) -> jax.Array:
  """Per-sequence, per-expert capacity in token order (Hugging Face Switch's `expert_capacity`).

  Within each sequence, the n-th choice (in token order) sent to expert e is kept iff
  n <= capacity. This is a router-stage rule: it depends only on routing, never on placement.

  Args:
    expert_ids: <int32>[B, L, k].
    dispatch_mask: <bool>[B, L, k].
    num_experts: E.
    capacity: kept choices per sequence per expert.

  Returns:
    <bool>[B, L, k] the narrowed dispatch mask.
  """
  one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.int32)          # [B, L, k, E]
  one_hot = one_hot * dispatch_mask[..., None].astype(jnp.int32)
  batch, length, k, _ = one_hot.shape
  # k-major priority within a sequence: all first choices in token order, then second choices.
  per_choice = jnp.swapaxes(one_hot, 1, 2).reshape(batch, k * length, num_experts)
  priority = jnp.cumsum(per_choice, axis=1)
  priority = jnp.swapaxes(priority.reshape(batch, k, length, num_experts), 1, 2)
  position = jnp.sum(priority * one_hot, axis=-1)                             # [B, L, k]
  return dispatch_mask & (position <= capacity)
