"""One-layer-ahead load predictors: hidden state entering MoE layer l -> load of MoE layer l'.

Every predictor returns a per-expert load estimate <f32>[E] for the next MoE layer. It is computed
from global (data-sharded) arrays with plain jnp reductions, so under jit XLA sums over the data
axis and every device sees the same estimate, hence the same placement.

Kinds:
  none     no estimate (no replicas are used);
  history  exponential moving average of past batches' true loads (what EPLB does);
  pregate  layer l' router applied to layer l's normalised hidden state (no training);
  learned  a small linear or low-rank map trained to predict l' routing from l's hidden state;
  learned_load  l' per-expert load predicted directly: top_k * sum over tokens of a softmax
           head (`learned_load`) trained on per-window load shares, not per-token labels;
  seed     the source paper's predictor: an LSTM over the stack's token embeddings predicts every
           MoE layer's experts before the first MoE layer runs (`moe_jax.seed_predictor`);
  hybrid   seed's estimate for each stack's first MoE layer (no earlier layer can predict it),
           learned_load's for the others;
  eplb     DeepSeek's expert-parallel load balancer: frozen per-expert counts of a calibration
           set (refreshed every N batches) packed by `moe_jax.eplb`, not by the greedy placement;
  reactive no prediction: layer l's own router output places layer l's replicas, and their fetch
           sits on the critical path (what reactive systems do); exact, but it waits;
  oracle   l' true routing: an upper bound for benchmarks only, never for serving.

A prediction only decides where expert copies live; the real router still routes every token.

The registry (`PREDICTORS`) is the one list of kinds: the stack runner, the benchmark's shared
"dynamic" program and the simulator all read it. A kind is an estimator with one signature,
`estimate(LayerInputs) -> (load <f32>[E], top1 <int32>[T])`, and a `source` saying what it reads
(the simulator replays that source from a recorded trace). Adding a kind is one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import routing


@struct.dataclass
class LayerInputs:
  """What an estimator may read when it predicts MoE layer l' while layer l runs.

  Attributes:
    x: <f>[T, d] the normalised hidden state entering layer l.
    next_router: <f32>[d, E] layer l' router.
    history: <f32>[E] layer l' load EMA over past batches.
    learned: layer-pair params of the learned predictor (None if not loaded).
    oracle: <f32>[E] layer l' true load of this batch (benchmarks only; None otherwise).
    next_bias: <f32>[E] layer l' selection bias ("router_bias"; sigmoid routers), or None.
    top_k: experts per token (static).
    moe_cfg: layer l' `MoEConfig` (static) when its routing rule is not plain softmax top-k:
      predicted logits then select experts by that rule (`routing.ROUTERS`), bias included.
    seed_load: <f32>[E] the seed predictor's load of layer l' (from the stack's embeddings).
    seed_top1: <int32>[T] the seed predictor's per-token top-1 for layer l' (-1: masked).
    calibration: <f32>[E] layer l' frozen calibration counts (eplb).
  """

  x: jax.Array
  next_router: jax.Array
  history: jax.Array
  learned: dict | None = None
  oracle: jax.Array | None = None
  next_bias: jax.Array | None = None
  seed_load: jax.Array | None = None
  seed_top1: jax.Array | None = None
  calibration: jax.Array | None = None
  top_k: int = struct.field(pytree_node=False, default=1)
  moe_cfg: Any = struct.field(pytree_node=False, default=None)


Estimate = tuple[jax.Array, jax.Array]      # (load <f32>[E], per-token top-1 <int32>[T] or -1)


@dataclasses.dataclass(frozen=True)
class Predictor:
  """One predictor kind.

  Attributes:
    name: the kind's name (`ReplicationConfig.predictor`).
    source: what it reads: "history" (past batches' true loads), "hidden_state" (layer l's
      input, per token: the simulator replays recorded predictions), "embedding" (the stack's
      token embeddings, before its first MoE layer), "calibration" (frozen counts of a
      calibration set), "in_layer" (layer l' own router output: placed when layer l' runs, the
      fetch on its critical path) or "truth" (this batch's true loads).
    estimate: LayerInputs -> Estimate. For "in_layer" kinds the runner calls it with layer l'
      own input and router.
    placer: "greedy" (`placement.place`) or "eplb" (`moe_jax.eplb`).
    first: the kind whose estimate places each stack's first MoE layer, which no earlier layer
      can predict ("": the history, or nothing, as `ReplicationConfig.first_layer` says).
  """

  name: str
  source: str
  estimate: Callable[[LayerInputs], Estimate]
  placer: str = "greedy"
  first: str = ""


def _no_top1(inputs: LayerInputs) -> jax.Array:
  return jnp.full((inputs.x.shape[0],), -1, jnp.int32)


def _from_logits(logits: jax.Array, inputs: LayerInputs) -> Estimate:
  """(load, top-1) of predicted layer-l' logits under layer l's routing rule."""
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  ids = _select(logits, inputs.top_k, inputs.moe_cfg, inputs.next_bias)
  top1 = jnp.where(finite, ids[:, 0], -1).astype(jnp.int32)
  return _counts(ids, finite, logits.shape[-1]), top1


PREDICTORS = {p.name: p for p in (
    Predictor("history", "history", lambda i: (i.history.astype(jnp.float32), _no_top1(i))),
    Predictor("pregate", "hidden_state",
              lambda i: _from_logits(pregate_logits(i.x, i.next_router), i)),
    Predictor("learned", "hidden_state",
              lambda i: _from_logits(learned_logits(i.learned, i.x), i)),
    Predictor("learned_load", "hidden_state",
              lambda i: (learned_load(i.learned, i.x, i.top_k), _no_top1(i))),
    Predictor("seed", "embedding", lambda i: (i.seed_load.astype(jnp.float32), i.seed_top1)),
    Predictor("hybrid", "hidden_state", lambda i: (
        0.5 * (learned_load(i.learned, i.x, i.top_k) + i.seed_load.astype(jnp.float32)),
        i.seed_top1), first="seed"),
    Predictor("eplb", "calibration", lambda i: (i.calibration.astype(jnp.float32), _no_top1(i)),
              placer="eplb"),
    Predictor("reactive", "in_layer",
              lambda i: _from_logits(pregate_logits(i.x, i.next_router), i)),
    Predictor("oracle", "truth", lambda i: (i.oracle.astype(jnp.float32), _no_top1(i))),
)}
REPLICATING = tuple(PREDICTORS)              # the kinds that place replicas, in a fixed order
KINDS = ("none",) + REPLICATING
# Kinds whose placement can be issued before the layer runs, so one compiled program can select
# among them by a traced index (the benchmark's "dynamic" program); "in_layer" kinds cannot.
AHEAD = tuple(k for k, p in PREDICTORS.items() if p.source != "in_layer")
# Kinds that read the learned predictor's params (`LayerInputs.learned`; StackRunner(learned=)).
LEARNED_KINDS = ("learned", "learned_load", "hybrid")
# Kinds that read the seed predictor's predictions (StackRunner(seed=)), for some layer.
SEED_KINDS = tuple(k for k, p in PREDICTORS.items() if "embedding" in (p.source, p.first and
                                                                        PREDICTORS[p.first].source))


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"predictor {kind!r} is not one of {KINDS}.")
  return kind


def choice_counts(logits: jax.Array, top_k: int, token_mask: jax.Array | None = None) -> jax.Array:
  """<f32>[E] how many of the tokens' top-k choices under `logits` <f32>[T, E] fall on each expert.

  Tokens with a non-finite row of logits count nowhere: the router sends them to no expert.
  """
  _, ids = routing.select_top_k(logits, top_k)                              # [T, k]
  keep = jnp.all(jnp.isfinite(logits), axis=-1)
  if token_mask is not None:
    keep = keep & token_mask.reshape(-1).astype(bool)
  return _counts(ids, keep, logits.shape[-1])


def _select(logits, top_k, moe_cfg, bias) -> jax.Array:
  """<int>[T, k] the experts `logits` <f32>[T, E] choose: softmax top-k, or `moe_cfg`'s rule."""
  if moe_cfg is None:
    return routing.select_top_k(logits, top_k)[1]
  return routing.ROUTERS[moe_cfg.router](logits, bias, moe_cfg)[1]


def _counts(ids: jax.Array, keep: jax.Array, num_experts: int) -> jax.Array:
  """<f32>[E] choices per expert of ids <int>[T, k], rows with keep <bool>[T] only."""
  weight = jnp.broadcast_to(keep[:, None], ids.shape).astype(jnp.float32)
  return jnp.zeros((num_experts,), jnp.float32).at[ids.reshape(-1)].add(weight.reshape(-1))


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


def load_head_logits(params: dict, x: jax.Array) -> jax.Array:
  """<f32>[T, E] the load head's logits on layer l's normalised input x <f>[T, d].

  `params` is one layer pair's learned params; its load head is `params["load"]` ({"w": [d, E],
  "b": [E]}). Params without one (checkpoints from before it, or the zero params of a program
  that never selects learned_load) use the per-token map's logits: its soft expected counts.
  """
  if "load" not in params:
    return learned_logits(params, x)
  head = params["load"]
  return jnp.dot(x.astype(jnp.float32), head["w"], precision=jax.lax.Precision.HIGHEST) + head["b"]


def learned_load(params: dict, x: jax.Array, top_k: int) -> jax.Array:
  """<f32>[E] layer l' expected load: top_k * sum over tokens of softmax(load head logits).

  Each token with a finite row of logits adds top_k spread over the experts, so the estimate
  sums to top_k * (tokens with a finite row); tokens with a non-finite row count nowhere (the
  router sends them to no expert).
  """
  logits = load_head_logits(params, x)                                      # [T, E]
  finite = jnp.all(jnp.isfinite(logits), axis=-1, keepdims=True)            # [T, 1]
  probs = jax.nn.softmax(jnp.where(finite, logits, 0.0), axis=-1)
  return top_k * jnp.sum(jnp.where(finite, probs, 0.0), axis=0)


def init_load_head(pair: dict) -> dict:
  """A load head starting from a layer pair's per-token map (its dense [d, E] map and bias)."""
  w = pair["w"] if "w" in pair else pair["u"] @ pair["v"]
  return {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(pair["b"], jnp.float32)}


# --- history -------------------------------------------------------------------------------------


def history_update(ema: jax.Array, true_load: jax.Array, decay: float) -> jax.Array:
  """EMA of per-expert loads; the first observation (ema == 0 everywhere) is taken as is."""
  true_load = true_load.astype(jnp.float32)
  fresh = jnp.all(ema == 0)
  return jnp.where(fresh, true_load, decay * ema + (1.0 - decay) * true_load)
