"""The "seed" predictor: one small LSTM reads a stack's embedding output and predicts, for every
token, the expert of every MoE layer of that stack at once (one head per MoE layer).

It runs before the first MoE layer of the stack: its predictions can place expert replicas for
all layers ahead of time (exact mode: they only place weights; the router still routes every
token), or stand in for the routers (approximate mode: the caller's choice, never this module's).

  params = init(key, d_model=64, hidden=64, num_layers=4, num_experts=32)
  scores = logits(params, embeddings, mask)                  # <f32>[n, B, L, E]
  pred = predict(params, embeddings, mask, top_k=2)          # SeedPrediction(ids, load, top1)

The network, per token t of a row (causal, so decoding can carry the state from step to step):
  u_t = W_in rms(e_t) + b_in                  input projection d_model -> hidden
  (h_t, c_t) = LSTM(u_t, (h_{t-1}, c_{t-1}))  one unidirectional layer (`lax.scan` over L)
  logits_t^l = W_l h_t + b_l                  one head per MoE layer l, hidden -> E
A stack whose layers see both sides of a token (an encoder: its attention is not causal) may add a
backward direction (`init(..., bidirectional=True)`): a second LSTM over the same u_t from right to
left, (h'_t, c'_t) = LSTM'(u_t, (h'_{t+1}, c'_{t+1})), and each head reads both,
logits_t^l = W_l [h_t, h'_t] + b_l (W_l: 2 hidden -> E). Such a predictor cannot decode step by
step (`logits_and_state` refuses it). A masked (padding) token leaves each direction's state as it
was, so real tokens never read padding, on either side. Training lives in
`moe_jax.app.seed_training`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import routing

_EPS = 1e-6


@struct.dataclass
class SeedPrediction:
  """What the heads predict for the T = B * L tokens of a batch (row-major [B, L] order, the
  order in which the MoE layer sees them).

  Attributes:
    ids: <int32>[n, T, k] per MoE layer, the experts each token is predicted to choose (best
      first), selected by the layer's routing rule.
    load: <f32>[n, E] per MoE layer, how many of the unmasked tokens' predicted choices fall on
      each expert.
    top1: <int32>[n, T] the first predicted choice; -1 for masked tokens.
  """

  ids: jax.Array
  load: jax.Array
  top1: jax.Array


@struct.dataclass
class LSTMState:
  """The recurrent state after a token: h, c <f32>[B, hidden]."""

  h: jax.Array
  c: jax.Array


_BACKWARD = "bwd_"   # prefix of the backward direction's LSTM params


def init(key: jax.Array, *, d_model: int, hidden: int, num_layers: int, num_experts: int,
         bidirectional: bool = False) -> dict:
  """Random params of a seed predictor for a stack of `num_layers` MoE layers.

  Args:
    bidirectional: add a backward LSTM (for a stack whose attention reads both sides of a token,
      e.g. an encoder); the heads then read [h_fwd, h_bwd].

  Returns:
    {"in_w": [d, h], "in_b": [h], "lstm_wx": [h, 4h], "lstm_wh": [h, 4h], "lstm_b": [4h],
     "head_w": [n, r, E], "head_b": [n, E]}, with `bidirectional` also "bwd_lstm_wx",
    "bwd_lstm_wh", "bwd_lstm_b" (the backward LSTM, same shapes) and r = 2h, else r = h (float32;
    LSTM gates in the order i, f, g, o, the forget gate's bias starting at 1).
  """
  for name, value in (("d_model", d_model), ("hidden", hidden), ("num_layers", num_layers),
                      ("num_experts", num_experts)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"seed predictor {name} must be a positive int, got {value!r}.")
  k_in, k_fwd, k_bwd, k_head = jax.random.split(key, 4)
  normal = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) * fan_in ** -0.5
  forget_bias = jnp.zeros((4, hidden), jnp.float32).at[1].set(1.0).reshape(-1)

  def lstm(k, prefix=""):
    k_x, k_h = jax.random.split(k)
    return {prefix + "lstm_wx": normal(k_x, (hidden, 4 * hidden), hidden),
            prefix + "lstm_wh": normal(k_h, (hidden, 4 * hidden), hidden),
            prefix + "lstm_b": forget_bias}

  head_in = 2 * hidden if bidirectional else hidden
  params = {"in_w": normal(k_in, (d_model, hidden), d_model),
            "in_b": jnp.zeros((hidden,), jnp.float32),
            **lstm(k_fwd),
            "head_w": normal(k_head, (num_layers, head_in, num_experts), head_in),
            "head_b": jnp.zeros((num_layers, num_experts), jnp.float32)}
  if bidirectional:
    params.update(lstm(k_bwd, _BACKWARD))
  return params


def is_bidirectional(params: dict) -> bool:
  """Whether `params` hold a backward LSTM (`init(..., bidirectional=True)`)."""
  return _BACKWARD + "lstm_wh" in params


def initial_state(params: dict, batch: int) -> LSTMState:
  """The all-zero state before a row's first token."""
  hidden = params["lstm_wh"].shape[0]
  zeros = jnp.zeros((batch, hidden), jnp.float32)
  return LSTMState(h=zeros, c=zeros)


def _check(params: dict, embeddings: jax.Array, mask: jax.Array | None) -> jax.Array:
  """The mask as <bool>[B, L] (all True if None); ValueError on shapes that do not fit."""
  if embeddings.ndim != 3 or embeddings.shape[-1] != params["in_w"].shape[0]:
    raise ValueError(f"embeddings must be [batch, length, d_model={params['in_w'].shape[0]}], "
                     f"got {list(embeddings.shape)}; pass the stack's embedding output "
                     "(family.token_embeddings).")
  if mask is None:
    return jnp.ones(embeddings.shape[:2], bool)
  if tuple(mask.shape) != tuple(embeddings.shape[:2]):
    raise ValueError(f"mask has shape {list(mask.shape)} but the embeddings are "
                     f"{list(embeddings.shape[:2])} tokens; give one entry per token.")
  return jnp.asarray(mask).astype(bool)


def _project(params: dict, embeddings: jax.Array) -> jax.Array:
  """<f32>[B, L, h] the LSTM input u of embeddings <f>[B, L, d] (rms-normalised, projected)."""
  x = embeddings.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _EPS)
  return jnp.einsum("bld,dh->blh", x, params["in_w"]) + params["in_b"]


def _run_lstm(params: dict, prefix: str, u: jax.Array, mask: jax.Array, state: LSTMState, *,
              reverse: bool = False) -> tuple[jax.Array, LSTMState]:
  """One direction's LSTM (params `prefix + "lstm_*"`) over u <f32>[B, L, h] from `state`, left
  to right (or right to left with `reverse`); a False in mask <bool>[B, L] keeps the state.

  Returns:
    (<f32>[L, B, h] the state h after each token, the state after the last token read).
  """
  wh = params[prefix + "lstm_wh"]
  # The input half of every gate at once; the scan only adds the recurrent half.
  gates_x = (jnp.einsum("blh,hg->lbg", u, params[prefix + "lstm_wx"])
             + params[prefix + "lstm_b"])                                     # [L, B, 4h]

  def step(carry: LSTMState, inputs):
    gate_x, keep = inputs                                                   # [B, 4h], [B]
    i, f, g, o = jnp.split(gate_x + carry.h @ wh, 4, axis=-1)
    c = jax.nn.sigmoid(f) * carry.c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    keep = keep[:, None]
    carry = LSTMState(h=jnp.where(keep, h, carry.h), c=jnp.where(keep, c, carry.c))
    return carry, carry.h

  state, hs = jax.lax.scan(step, state, (gates_x, mask.T), reverse=reverse)
  return hs, state


def _heads(params: dict, hs: jax.Array) -> jax.Array:
  """<f32>[n, B, L, E] the heads' logits of hs <f32>[L, B, r] (r: the heads' input width)."""
  return jnp.einsum("lbr,nre->nble", hs, params["head_w"]) + params["head_b"][:, None, None, :]


def logits_and_state(params: dict, embeddings: jax.Array, mask: jax.Array | None,
                     state: LSTMState | None = None) -> tuple[jax.Array, LSTMState]:
  """Head logits of L new tokens per row, continuing from `state` (None: a row's start).

  Args:
    params: from `init` (or training), causal (not `bidirectional`).
    embeddings: <f>[B, L, d] the stack's embedding output.
    mask: <bool>[B, L] False at padding (the state passes such tokens unchanged), or None.
    state: the state after the row's previous tokens (decoding), or None.

  Returns:
    (<f32>[n, B, L, E] logits, the state after the last token).
  """
  if is_bidirectional(params):
    raise ValueError("this seed predictor is bidirectional (each token's prediction reads the "
                     "tokens after it), so it has no state to carry from one decoding step to "
                     "the next; call logits() on whole rows, or train a causal predictor "
                     "(init(..., bidirectional=False)) for a stack that decodes.")
  mask = _check(params, embeddings, mask)
  if state is None:
    state = initial_state(params, embeddings.shape[0])
  hs, state = _run_lstm(params, "", _project(params, embeddings), mask, state)   # [L, B, h]
  return _heads(params, hs), state


def logits(params: dict, embeddings: jax.Array, mask: jax.Array | None) -> jax.Array:
  """<f32>[n, B, L, E] every head's logits for every token of embeddings <f>[B, L, d] (mask
  <bool>[B, L] or None: see `logits_and_state`); a bidirectional predictor reads whole rows."""
  if not is_bidirectional(params):
    return logits_and_state(params, embeddings, mask)[0]
  mask = _check(params, embeddings, mask)
  u = _project(params, embeddings)
  start = initial_state(params, embeddings.shape[0])
  forward, _ = _run_lstm(params, "", u, mask, start)                        # [L, B, h]
  backward, _ = _run_lstm(params, _BACKWARD, u, mask, start, reverse=True)  # [L, B, h]
  return _heads(params, jnp.concatenate([forward, backward], axis=-1))     # [n, B, L, E]


def select(layer_logits: jax.Array, top_k: int, moe_cfg: Any = None,
           bias: jax.Array | None = None) -> jax.Array:
  """<int32>[T, k] the experts `layer_logits` <f32>[T, E] choose: the MoE layer's rule
  (`routing.ROUTERS[moe_cfg.router]`, with its selection `bias` <f32>[E] and groups) when a
  `MoEConfig` is given, else softmax top-k (best first, ties to the lowest index)."""
  if moe_cfg is None:
    return routing.select_top_k(layer_logits, top_k)[1].astype(jnp.int32)
  if moe_cfg.top_k != top_k:
    moe_cfg = dataclasses.replace(moe_cfg, top_k=top_k)
  return routing.ROUTERS[moe_cfg.router](layer_logits, bias, moe_cfg)[1].astype(jnp.int32)


def predict(params: dict, embeddings: jax.Array, mask: jax.Array | None, *, top_k: int,
            moe_cfg: Any = None, biases: Sequence[jax.Array | None] | jax.Array | None = None
            ) -> SeedPrediction:
  """Every MoE layer's predicted experts and loads for a batch.

  Args:
    params: the stack's seed predictor.
    embeddings: <f>[B, L, d] the stack's embedding output; mask: <bool>[B, L] or None.
    top_k: experts per token.
    moe_cfg: the layers' `MoEConfig` when their routing rule is not plain softmax top-k (e.g. a
      sigmoid router with groups), else None.
    biases: per MoE layer its selection bias <f32>[E] ("router_bias") or None; a list of n or an
      array <f32>[n, E]; None: no layer has one.

  Returns:
    A `SeedPrediction`; masked tokens and tokens with non-finite logits count nowhere.
  """
  mask = _check(params, embeddings, mask)
  scores = logits(params, embeddings, mask)                                 # [n, B, L, E]
  num_layers, num_experts = scores.shape[0], scores.shape[-1]
  if biases is not None and len(biases) != num_layers:
    raise ValueError(f"biases has {len(biases)} entries but the predictor has {num_layers} "
                     "heads; give one per MoE layer (None where a layer has no bias).")
  flat = scores.reshape(num_layers, -1, num_experts)                        # [n, T, E]
  ids, loads, top1s = [], [], []
  for layer in range(num_layers):
    bias = None if biases is None else biases[layer]
    layer_ids = select(flat[layer], top_k, moe_cfg, bias)                   # [T, k]
    keep = mask.reshape(-1) & jnp.all(jnp.isfinite(flat[layer]), axis=-1)  # [T]
    counts = routing.expert_counts(layer_ids, jnp.broadcast_to(keep[:, None], layer_ids.shape),
                                   num_experts)
    ids.append(layer_ids)
    loads.append(counts.astype(jnp.float32))
    top1s.append(jnp.where(keep, layer_ids[:, 0], -1))
  return SeedPrediction(ids=jnp.stack(ids), load=jnp.stack(loads), top1=jnp.stack(top1s))
