"""Training the learned one-layer-ahead predictor from recorded routing traces.

1. Record: run a model with `TraceRecorder.moe_fn` as its MoE hook; it keeps, for every MoE layer,
   the layer's normalised input x <f>[T, d] and its router probabilities <f32>[T, E].
2. Pair: the predictor for layer l + 1 learns from (x_l, probs_{l+1}).
3. Train: soft-target cross-entropy with AdamW (optax), starting from the pregate map; then the
   load head (`learned_load`) on per-window load shares (KL), starting from that map.
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


LOAD_GROUP_TOKENS = 64   # tokens per aggregate target of the load head (one Switch window)


def train_learned(traces: dict, routers: dict, *, rank: int | None = None, steps: int = 300,
                  batch_size: int = 512, learning_rate: float = 3e-3, weight_decay: float = 1e-4,
                  seed: int = 0, log_every: int = 100, token_weights: dict | None = None,
                  top_k: int = 1, load_steps: int | None = None,
                  group_tokens: int = LOAD_GROUP_TOKENS) -> dict:
  """Trains one predictor per consecutive MoE-layer pair of every stack.

  Per pair, first the per-token map ("learned": soft cross-entropy against layer l + 1's router
  probabilities), then the load head ("learned_load", `params["load"]`) starting from that map:
  KL divergence between layer l + 1's load share and the head's predicted share, both summed
  over runs of `group_tokens` consecutive tokens (a trace keeps each window's tokens together).

  Args:
    traces: stack -> ([x_l <f32>[N, d]], [probs_l <f32>[N, E]]) from `TraceRecorder`.
    routers: stack -> [router kernel <f32>[d, E] of each MoE layer] (the pregate starting point).
    rank: None for a full [d, E] map, or the rank of a low-rank map.
    steps, batch_size, learning_rate, weight_decay, seed: AdamW training knobs (per-token map).
    log_every: absl-log the loss every this many steps.
    token_weights: optional stack -> <f32>[N] weights (e.g. 0 for padding tokens).
    top_k: experts per token: the load head's target is the top_k of each token's probabilities
      (the router's choice; exact for softmax routers).
    load_steps: AdamW steps of the load head (None: `steps`), 64 groups per step.
    group_tokens: tokens per aggregate target.

  Returns:
    stack -> [params of the predictor for layer l + 1, l = 0 .. n - 2].
  """
  learned = {}
  key = jax.random.key(seed)
  for stack, (xs, probs) in traces.items():
    learned[stack] = []
    weights = None if token_weights is None else token_weights.get(stack)
    for l in range(len(xs) - 1):
      key, init_key, data_key, load_key = jax.random.split(key, 4)
      name = f"{stack}[{l}->{l + 1}]"
      params = predictor_lib.init_learned(
          init_key, xs[l].shape[-1], probs[l + 1].shape[-1], rank=rank,
          next_router=None if rank is not None else routers[stack][l + 1])
      x, target = jnp.asarray(xs[l]), jnp.asarray(probs[l + 1])
      w_all = (jnp.ones((x.shape[0],), jnp.float32) if weights is None
               else jnp.asarray(weights, jnp.float32))
      params = _fit(params, soft_cross_entropy, (x, target, w_all), data_key, steps=steps,
                    batch_size=batch_size, learning_rate=learning_rate,
                    weight_decay=weight_decay, log_every=log_every, name=name)
      groups = load_groups(xs[l], probs[l + 1], top_k, weights, group_tokens)
      params["load"] = _fit(predictor_lib.init_load_head(params), load_divergence, groups,
                            load_key, steps=steps if load_steps is None else load_steps,
                            batch_size=64, learning_rate=learning_rate,
                            weight_decay=weight_decay, log_every=log_every, name=name + " load")
      learned[stack].append(params)
  return learned


def soft_cross_entropy(params, x, target_probs, weights=None):
  """Mean over tokens of -sum_e p_e log q_e (q: predicted, p: the next layer's router)."""
  logq = jax.nn.log_softmax(predictor_lib.learned_logits(params, x), axis=-1)
  loss = -jnp.sum(target_probs * logq, axis=-1)
  if weights is None:
    return jnp.mean(loss)
  return jnp.sum(loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def choices(probs: np.ndarray, top_k: int) -> np.ndarray:
  """<f32>[N, E] 1 where an expert is among a token's top_k probabilities <f>[N, E], else 0."""
  probs = np.asarray(probs, np.float32)
  ids = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
  out = np.zeros_like(probs)
  np.put_along_axis(out, ids, 1.0, axis=-1)
  return out


def load_groups(x, probs, top_k: int, weights=None, group_tokens: int = LOAD_GROUP_TOKENS):
  """(x <f32>[G, n, d], choices <f32>[G, n, E], weights <f32>[G, n]): the trace's tokens in runs
  of n = group_tokens (the remainder dropped), the load head's training groups."""
  num = x.shape[0] // group_tokens * group_tokens
  if num == 0:
    raise ValueError(f"a trace of {x.shape[0]} tokens has no group of {group_tokens}; record "
                     "more batches or lower group_tokens.")
  w = np.ones((x.shape[0],), np.float32) if weights is None else np.asarray(weights, np.float32)
  shape = (num // group_tokens, group_tokens)
  return (jnp.asarray(np.asarray(x, np.float32)[:num].reshape(*shape, -1)),
          jnp.asarray(choices(probs, top_k)[:num].reshape(*shape, -1)),
          jnp.asarray(w[:num].reshape(shape)))


def load_divergence(head, x, chosen, weights):
  """Mean over groups of KL(true load share || predicted load share).

  Args:
    head: the load head {"w": [d, E], "b": [E]}.
    x: <f32>[G, n, d] each group's layer-l inputs; chosen: <f32>[G, n, E] layer l + 1's choices
      (`choices`); weights: <f32>[G, n] (0: the token counts nowhere).
  """
  probs = jax.nn.softmax(predictor_lib.load_head_logits({"load": head}, x), axis=-1)
  predicted = jnp.sum(probs * weights[..., None], axis=1)                   # [G, E]
  predicted = predicted / jnp.maximum(jnp.sum(predicted, -1, keepdims=True), 1e-30)
  true = jnp.sum(chosen * weights[..., None], axis=1)
  true = true / jnp.maximum(jnp.sum(true, -1, keepdims=True), 1e-30)
  kl = jnp.sum(true * (jnp.log(jnp.maximum(true, 1e-30)) - jnp.log(predicted + 1e-9)), axis=-1)
  return jnp.mean(kl)


def _fit(params, loss_fn, data: tuple, key, *, steps, batch_size, learning_rate, weight_decay,
         log_every, name):
  """AdamW on loss_fn(params, *data), each step on a random batch of data's leading axis."""
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
  opt_state = optimizer.init(params)
  num = data[0].shape[0]

  @jax.jit
  def step(params, opt_state, key):
    idx = jax.random.randint(key, (min(batch_size, num),), 0, num)
    loss, grads = jax.value_and_grad(loss_fn)(params, *(a[idx] for a in data))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start_loss = float(loss_fn(params, *data))
  for i in range(steps):
    key, sub = jax.random.split(key)
    params, opt_state, loss = step(params, opt_state, sub)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
      logging.info("predictor %s step %d/%d batch loss %.4f", name, i + 1, steps, float(loss))
  end_loss = float(loss_fn(params, *data))
  logging.info("predictor %s: full-data loss %.4f -> %.4f", name, start_loss, end_loss)
  return params


# --- evaluation ----------------------------------------------------------------------------------


def evaluate(traces: dict, learned: dict, routers: dict, *, top_k: int,
             group_tokens: int = LOAD_GROUP_TOKENS) -> dict:
  """Per layer pair "stack[l->l+1]": pregate's, the learned map's and the load head's prediction
  of layer l + 1 from layer l's input, scored against layer l + 1's router scores (`traces`,
  e.g. held out).

  Returns:
    {pair: {"pregate": m, "learned": m, "learned_load": m}}, m = {"hit": top-1 hit rate,
    "recall": recall@top_k of the router's top_k, "l1": load L1 error over all tokens,
    "l1_window": mean load L1 error per run of `group_tokens` tokens} (`moe_jax.metrics`).
    The load head predicts no token's expert: its hit and recall are None. The router's choice
    is the top_k of its scores (exact for softmax routers).
  """
  out = {}
  for stack, (xs, probs) in traces.items():
    for l, params in enumerate(learned.get(stack, [])):
      x, target = np.asarray(xs[l], np.float32), np.asarray(probs[l + 1], np.float32)
      true = choices(target, top_k)
      scores = {}
      for name, logits in (("pregate", predictor_lib.pregate_logits(x, routers[stack][l + 1])),
                           ("learned", predictor_lib.learned_logits(params, x))):
        logits = np.asarray(logits)
        scores[name] = dict(_choice_scores(logits, target, top_k),
                            **_load_errors(choices(logits, top_k), true, group_tokens))
      soft = top_k * np.asarray(jax.nn.softmax(predictor_lib.load_head_logits(params, x), -1))
      scores["learned_load"] = dict(hit=None, recall=None, **_load_errors(soft, true, group_tokens))
      out[f"{stack}[{l}->{l + 1}]"] = scores
  return out


def format_scores(m: dict) -> str:
  """"hit / recall / L1 / window L1" of one `evaluate` entry ("-" where n/a)."""
  return " / ".join("-" if m[key] is None else f"{m[key]:.3f}"
                    for key in ("hit", "recall", "l1", "l1_window"))


def _choice_scores(logits: np.ndarray, target: np.ndarray, top_k: int) -> dict:
  true_ids = np.argsort(-target, axis=-1, kind="stable")[:, :top_k]
  predicted_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
  return {"hit": metrics.hit_rate(predicted_ids[:, 0], true_ids),
          "recall": metrics.recall_at(logits, true_ids, top_k)}


def _load_errors(predicted: np.ndarray, true: np.ndarray, group_tokens: int) -> dict:
  """Load L1 errors of per-token expected choices predicted <f>[N, E] vs true <f>[N, E]: over
  all tokens, and the mean over runs of `group_tokens` tokens."""
  groups = max(true.shape[0] // group_tokens, 1)
  num = min(groups * group_tokens, true.shape[0])
  per_group = lambda a: a[:num].reshape(groups, -1, a.shape[-1]).sum(1)
  return {"l1": metrics.load_l1_error(predicted.sum(0), true.sum(0)),
          "l1_window": float(np.mean([metrics.load_l1_error(p, t) for p, t in
                                      zip(per_group(predicted), per_group(true))]))}


# --- checkpoints ---------------------------------------------------------------------------------


def save_learned(path: str, learned: dict, *, metadata: dict | None = None, force: bool = False):
  """Saves {stack: [pair params]} with orbax (plus a JSON manifest of shapes)."""
  from moe_jax.checkpoints import orbax_io
  return orbax_io.save_params(path, {"learned": learned}, metadata=metadata, force=force)


def learned_template(layer_counts: dict, d_model: int, num_experts: int,
                     rank: int | None = None) -> dict:
  """The expected tree of a learned predictor: stack -> [n - 1 pair param shapes], each pair the
  per-token map ("w", or low rank "u", "v"; "b") and its load head ("load": {"w", "b"})."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  def pair():
    head = {"load": {"b": f32(num_experts), "w": f32(d_model, num_experts)}}
    if rank is None:
      return {"b": f32(num_experts), "w": f32(d_model, num_experts), **head}
    return {"b": f32(num_experts), "u": f32(d_model, rank), "v": f32(rank, num_experts), **head}
  return {stack: [pair() for _ in range(n - 1)] for stack, n in layer_counts.items()}


def restore_learned(path: str, *, template: dict | None = None) -> dict:
  """Restores {stack: [pair params]}; with `template` (see `learned_template`) a checkpoint of the
  wrong shape raises ValueError naming the tree path, the expected and the found shapes."""
  from moe_jax.checkpoints import orbax_io
  target = None if template is None else {"learned": template}
  return orbax_io.restore_params(path, target=target)["learned"]
