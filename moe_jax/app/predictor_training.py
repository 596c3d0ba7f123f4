"""Training the learned one-layer-ahead predictor from recorded routing traces.

1. Record: run a model with `TraceRecorder.moe_fn` as its MoE hook; it keeps, for every MoE layer,
   the layer's normalised input x <f>[T, d] and its router probabilities <f32>[T, E].
2. Pair: the predictor for layer l + 1 learns from (x_l, probs_{l+1}).
3. Train: soft-target cross-entropy with AdamW (optax), starting from the pregate map.
4. Save / restore with orbax (`save_learned`, `restore_learned`).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax
from absl import logging

from moe_jax import metrics
from moe_jax import predictor as predictor_lib


class TraceRecorder:
  """Wraps a `moe_fn` hook and keeps each MoE layer's input and router probabilities."""

  def __init__(self, inner_moe_fn):
    self.inner = inner_moe_fn
    self.inputs: dict = {}
    self.probs: dict = {}

  def moe_fn(self, stack, index, ff_params, x, routing):
    y, stats = self.inner(stack, index, ff_params, x, routing)
    self.inputs.setdefault(stack, {})[index] = x.reshape(-1, x.shape[-1])
    self.probs.setdefault(stack, {})[index] = stats.routing.probs
    return y, stats

  def traces(self) -> dict:
    """stack -> ([x_0, x_1, ...], [probs_0, probs_1, ...]) as traced/jax arrays."""
    out = {}
    for stack, inputs in self.inputs.items():
      order = sorted(inputs)
      out[stack] = ([inputs[i] for i in order], [self.probs[stack][i] for i in order])
    return out


def concat_traces(batches: list[dict]) -> dict:
  """Concatenates per-batch `TraceRecorder.traces()` (as numpy) along tokens."""
  out = {}
  for stack in batches[0]:
    n = len(batches[0][stack][0])
    xs, ps = ([np.concatenate([np.asarray(b[stack][part][layer], np.float32) for b in batches])
               for layer in range(n)] for part in (0, 1))
    out[stack] = (xs, ps)
  return out


def train_learned(traces: dict, routers: dict, *, rank: int | None = None, steps: int = 300,
                  batch_size: int = 512, learning_rate: float = 3e-3, weight_decay: float = 1e-4,
                  seed: int = 0, log_every: int = 100, token_weights: dict | None = None) -> dict:
  """Trains one predictor per consecutive MoE-layer pair of every stack.

  Args:
    traces: stack -> ([x_l <f32>[N, d]], [probs_l <f32>[N, E]]) from `TraceRecorder`.
    routers: stack -> [router kernel <f32>[d, E] of each MoE layer] (the pregate starting point).
    rank: None for a full [d, E] map, or the rank of a low-rank map.
    steps, batch_size, learning_rate, weight_decay, seed: AdamW training knobs.
    log_every: absl-log the loss every this many steps.
    token_weights: optional stack -> <f32>[N] weights (e.g. 0 for padding tokens).

  Returns:
    stack -> [params of the predictor for layer l + 1, l = 0 .. n - 2].
  """
  learned = {}
  key = jax.random.key(seed)
  for stack, (xs, probs) in traces.items():
    learned[stack] = []
    weights = None if token_weights is None else token_weights.get(stack)
    for l in range(len(xs) - 1):
      key, init_key, data_key = jax.random.split(key, 3)
      params = predictor_lib.init_learned(
          init_key, xs[l].shape[-1], probs[l + 1].shape[-1], rank=rank,
          next_router=None if rank is not None else routers[stack][l + 1])
      params = _fit(params, jnp.asarray(xs[l]), jnp.asarray(probs[l + 1]), weights, data_key,
                    steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                    weight_decay=weight_decay, log_every=log_every, name=f"{stack}[{l}->{l + 1}]")
      learned[stack].append(params)
  return learned


def soft_cross_entropy(params, x, target_probs, weights=None):
  """Mean over tokens of -sum_e p_e log q_e (q: predicted, p: the next layer's router)."""
  logq = jax.nn.log_softmax(predictor_lib.learned_logits(params, x), axis=-1)
  loss = -jnp.sum(target_probs * logq, axis=-1)
  if weights is None:
    return jnp.mean(loss)
  return jnp.sum(loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _fit(params, x, target, weights, key, *, steps, batch_size, learning_rate, weight_decay,
         log_every, name):
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
  opt_state = optimizer.init(params)
  num = x.shape[0]
  w_all = jnp.ones((num,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)

  @jax.jit
  def step(params, opt_state, key):
    idx = jax.random.randint(key, (min(batch_size, num),), 0, num)
    loss, grads = jax.value_and_grad(soft_cross_entropy)(params, x[idx], target[idx], w_all[idx])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start_loss = float(soft_cross_entropy(params, x, target, w_all))
  for i in range(steps):
    key, sub = jax.random.split(key)
    params, opt_state, loss = step(params, opt_state, sub)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
      logging.info("predictor %s step %d/%d batch loss %.4f", name, i + 1, steps, float(loss))
  end_loss = float(soft_cross_entropy(params, x, target, w_all))
  logging.info("predictor %s: full-data loss %.4f -> %.4f", name, start_loss, end_loss)
  return params


# --- evaluation ----------------------------------------------------------------------------------


def evaluate(traces: dict, learned: dict, routers: dict, *, top_k: int) -> dict:
  """Per layer pair "stack[l->l+1]": pregate's and the learned map's prediction of layer l + 1
  from layer l's input, scored against layer l + 1's router scores (`traces`, e.g. held out).

  Returns:
    {pair: {"pregate": m, "learned": m}}, m = {"hit": top-1 hit rate, "recall": recall@top_k of
    the router's top_k, "l1": load L1 error of the top_k choice counts} (`moe_jax.metrics`).
    The router's choice is the top_k of its scores (exact for softmax routers).
  """
  out = {}
  for stack, (xs, probs) in traces.items():
    for l, params in enumerate(learned.get(stack, [])):
      x, target = np.asarray(xs[l], np.float32), np.asarray(probs[l + 1], np.float32)
      candidates = {"pregate": np.asarray(predictor_lib.pregate_logits(x, routers[stack][l + 1])),
                    "learned": np.asarray(predictor_lib.learned_logits(params, x))}
      out[f"{stack}[{l}->{l + 1}]"] = {name: _scores(logits, target, top_k)
                                       for name, logits in candidates.items()}
  return out


def _scores(logits: np.ndarray, target: np.ndarray, top_k: int) -> dict:
  true_ids = np.argsort(-target, axis=-1, kind="stable")[:, :top_k]
  predicted_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
  load = lambda ids: np.bincount(ids.reshape(-1), minlength=target.shape[-1])
  return {"hit": metrics.hit_rate(predicted_ids[:, 0], true_ids),
          "recall": metrics.recall_at(logits, true_ids, top_k),
          "l1": metrics.load_l1_error(load(predicted_ids), load(true_ids))}


# --- checkpoints ---------------------------------------------------------------------------------


def save_learned(path: str, learned: dict, *, metadata: dict | None = None, force: bool = False):
  """Saves {stack: [pair params]} with orbax (plus a JSON manifest of shapes)."""
  from moe_jax.checkpoints import orbax_io
  return orbax_io.save_params(path, {"learned": learned}, metadata=metadata, force=force)


def learned_template(layer_counts: dict, d_model: int, num_experts: int,
                     rank: int | None = None) -> dict:
  """The expected tree of a learned predictor: stack -> [n - 1 pair param shapes]."""
  def pair():
    if rank is None:
      return {"b": jax.ShapeDtypeStruct((num_experts,), jnp.float32),
              "w": jax.ShapeDtypeStruct((d_model, num_experts), jnp.float32)}
    return {"b": jax.ShapeDtypeStruct((num_experts,), jnp.float32),
            "u": jax.ShapeDtypeStruct((d_model, rank), jnp.float32),
            "v": jax.ShapeDtypeStruct((rank, num_experts), jnp.float32)}
  return {stack: [pair() for _ in range(n - 1)] for stack, n in layer_counts.items()}


def restore_learned(path: str, *, template: dict | None = None) -> dict:
  """Restores {stack: [pair params]}; with `template` (see `learned_template`) a checkpoint of the
  wrong shape raises ValueError naming the tree path, the expected and the found shapes."""
  from moe_jax.checkpoints import orbax_io
  target = None if template is None else {"learned": template}
  return orbax_io.restore_params(path, target=target)["learned"]
