"""Training the seed predictor (`moe_jax.seed_predictor`) from recorded routing traces.

1. Record (`record_traces`): run the model over text batches with `SeedRecorder.moe_fn` as its
   MoE hook; keep, per stack, the embedding output and mask (`family.token_embeddings`) and every
   MoE layer's router probabilities and chosen experts (and, for scoring the one-layer-ahead
   predictors beside it, every MoE layer's normalised input).
2. Train (`train_seed`): per stack one LSTM (bidirectional for the stacks whose attention reads
   both sides of a token: `bidirectional_stacks`); soft cross-entropy of every head against its
   layer's router probabilities over the unmasked tokens; AdamW (optax).
3. Score (`evaluate`): per MoE layer on held-out traces: top-1 hit rate, recall@k and load L1
   error (`moe_jax.metrics`); for layers l >= 1 pregate and the learned map (from layer l - 1's
   input) beside it.
4. Save / restore with orbax (`save_seed`, `restore_seed`, `seed_template`); the metadata records
   the LSTM width ("hidden") and which stacks are bidirectional ("bidirectional": stack -> bool).

`train_on_pydoc` is the job behind launch/train_seed_predictor.py.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from moe_jax import metrics
from moe_jax import predictor as predictor_lib
from moe_jax import seed_predictor
from moe_jax.app import data as data_lib
from moe_jax.app import runtime, workflows
from moe_jax.app.config import Job, UsageError
from moe_jax.moe_fn import DefaultMoE


class SeedRecorder:
  """Wraps a `moe_fn` hook; keeps each MoE layer's router probabilities and chosen experts (and
  its input when `keep_inputs`), keyed by stack and index."""

  def __init__(self, inner_moe_fn, *, keep_inputs: bool = False):
    self.inner, self.keep_inputs = inner_moe_fn, keep_inputs
    self.layers: dict = {}

  def moe_fn(self, stack, index, ff_params, x, routing):
    y, stats = self.inner(stack, index, ff_params, x, routing)
    kept = {"probs": stats.routing.probs, "ids": stats.routing.expert_ids.astype(jnp.int32)}
    if self.keep_inputs:
      kept["inputs"] = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    self.layers.setdefault(stack, {})[index] = kept
    return y, stats


def record_traces(family, model_cfg, params, batches, moe_fn, *, keep_inputs: bool = False
                  ) -> dict:
  """Seed-predictor traces of `batches` (dicts `family.forward_batch` takes), as numpy.

  Returns:
    stack -> {"embeddings": <f32>[N, L, d], "mask": <bool>[N, L], "probs": <f32>[n, N, L, E],
    "ids": <int32>[n, N * L, k] (the router's choices), and with `keep_inputs` "inputs":
    <f32>[n, N * L, d] (each MoE layer's normalised input)}; N: rows over all batches.
  """
  recorder = SeedRecorder(moe_fn, keep_inputs=keep_inputs)
  order = []   # the family's stack order (jax returns dicts sorted by key)

  @jax.jit
  def record(params, batch):
    recorder.layers = {}
    family.forward_batch(params, model_cfg, batch, recorder.moe_fn)
    embedded = family.token_embeddings(params, model_cfg, batch)
    order[:] = list(embedded)
    out = {}
    for stack, (embeddings, mask) in embedded.items():
      layers = [recorder.layers[stack][i] for i in sorted(recorder.layers[stack])]
      rows, length = mask.shape
      out[stack] = {"embeddings": embeddings.astype(jnp.float32), "mask": mask,
                    "probs": jnp.stack([l["probs"].reshape(rows, length, -1) for l in layers]),
                    "ids": jnp.stack([l["ids"] for l in layers])}
      if keep_inputs:
        out[stack]["inputs"] = jnp.stack([l["inputs"] for l in layers])
    return out

  recorded = [jax.tree.map(np.asarray, record(params, batch)) for batch in batches]
  if not recorded:
    raise UsageError("no batches to record: the text gave fewer windows than one batch; lower "
                     "--config.data.batch_size.")
  axis = {"embeddings": 0, "mask": 0, "probs": 1, "ids": 1, "inputs": 1}
  return {stack: {name: np.concatenate([r[stack][name] for r in recorded], axis=axis[name])
                  for name in recorded[0][stack]}
          for stack in order}


# --- training ------------------------------------------------------------------------------------


def bidirectional_stacks(family) -> tuple[str, ...]:
  """The stacks of `family` whose seed predictor reads both sides of a token (the family's
  optional BIDIRECTIONAL_STACKS, e.g. ("encoder",)); only stacks whose attention is not causal
  and that are never decoded step by step qualify. Default: none. (Switch sets none: on
  switch_tiny a bidirectional encoder predictor scored a lower held-out hit rate than the causal
  one, 0.39 / 0.40 / 0.35 vs 0.42 / 0.41 / 0.36.)"""
  return tuple(getattr(family, "BIDIRECTIONAL_STACKS", ()))


def seed_loss(params: dict, embeddings, mask, target_probs) -> jax.Array:
  """<f32>[] mean over heads and unmasked tokens of -sum_e p_e log q_e.

  Args:
    embeddings: <f>[B, L, d]; mask: <bool>[B, L].
    target_probs: <f32>[n, B, L, E] each layer's router scores (normalised here to sum 1, so a
      sigmoid router's scores work too).
  """
  logq = jax.nn.log_softmax(seed_predictor.logits(params, embeddings, mask), axis=-1)
  target = target_probs / jnp.maximum(jnp.sum(target_probs, axis=-1, keepdims=True), 1e-9)
  per_token = -jnp.sum(target * logq, axis=-1)                              # [n, B, L]
  weights = jnp.broadcast_to(mask.astype(jnp.float32), per_token.shape)
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def train_seed(traces: dict, *, hidden: int = 96, steps: int = 2000, batch_size: int = 32,
               learning_rate: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0,
               log_every: int = 200, bidirectional: tuple[str, ...] = ()) -> tuple[dict, dict]:
  """Trains one seed predictor per stack of `traces` (`record_traces`).

  Args:
    hidden: the LSTM width.
    bidirectional: the stacks whose predictor also runs right to left (`bidirectional_stacks`).
    steps, batch_size (rows per step), learning_rate (peak of a warm-up + cosine schedule),
      weight_decay, seed: AdamW knobs (gradients clipped to global norm 1).
    log_every: absl-log the batch loss every this many steps.

  Returns:
    ({stack: params}, {stack: {"start_loss", "end_loss"}} over all the traces' tokens).
  """
  seeds, losses = {}, {}
  key = jax.random.key(seed)
  for stack, trace in traces.items():
    key, init_key, data_key = jax.random.split(key, 3)
    num_layers, _, _, num_experts = trace["probs"].shape
    params = seed_predictor.init(init_key, d_model=trace["embeddings"].shape[-1], hidden=hidden,
                                 num_layers=num_layers, num_experts=num_experts,
                                 bidirectional=stack in bidirectional)
    seeds[stack], losses[stack] = _fit(
        params, trace, data_key, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        weight_decay=weight_decay, log_every=log_every, name=stack)
  return seeds, losses


def _fit(params, trace, key, *, steps, batch_size, learning_rate, weight_decay, log_every, name):
  embeddings, mask = jnp.asarray(trace["embeddings"]), jnp.asarray(trace["mask"])
  probs = jnp.asarray(trace["probs"])
  rows = embeddings.shape[0]
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=max(1, min(100, steps // 10)), decay_steps=max(steps, 1),
      end_value=learning_rate * 0.1)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=weight_decay))
  opt_state = optimizer.init(params)
  full_loss = jax.jit(seed_loss)

  @jax.jit
  def step(params, opt_state, key):
    idx = jax.random.randint(key, (min(batch_size, rows),), 0, rows)
    loss, grads = jax.value_and_grad(seed_loss)(params, embeddings[idx], mask[idx],
                                                probs[:, idx])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start_loss = float(full_loss(params, embeddings, mask, probs))
  for i in range(steps):
    key, sub = jax.random.split(key)
    params, opt_state, loss = step(params, opt_state, sub)
    if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
      logging.info("seed predictor %s step %d/%d batch loss %.4f", name, i + 1, steps,
                   float(loss))
  end_loss = float(full_loss(params, embeddings, mask, probs))
  logging.info("seed predictor %s: full-data loss %.4f -> %.4f", name, start_loss, end_loss)
  return params, {"start_loss": start_loss, "end_loss": end_loss}


# --- evaluation ----------------------------------------------------------------------------------


def evaluate(traces: dict, seeds: dict, *, top_k: int, moe_cfg=None, biases: dict | None = None,
             routers: dict | None = None, learned: dict | None = None) -> dict:
  """Per MoE layer "stack/l": the seed predictor's prediction scored against the router's choices
  (`traces`, e.g. held out), and for l >= 1 pregate's and the learned map's from layer l - 1's
  input (when `routers` / `learned` are given and the traces hold "inputs").

  Args:
    top_k, moe_cfg: the layers' choice (`seed_predictor.select`), for every candidate alike.
    biases: stack -> [per layer selection bias <f32>[E] or None], or None.
    routers: stack -> [router kernel <f32>[d, E]]; learned: stack -> [pair params].

  Returns:
    {"stack/l": {kind: {"hit": top-1 hit rate, "recall": share of the router's k choices among
    the k predicted, "l1": load L1 error}}} over unmasked tokens (`moe_jax.metrics`).
  """
  out = {}
  for stack, trace in traces.items():
    stack_biases = None if biases is None else biases.get(stack)
    pred = jax.jit(seed_predictor.predict, static_argnames=("top_k", "moe_cfg"))(
        seeds[stack], trace["embeddings"], trace["mask"], top_k=top_k, moe_cfg=moe_cfg,
        biases=stack_biases)
    keep = np.asarray(trace["mask"]).reshape(-1)
    for l, true_ids in enumerate(trace["ids"]):
      true_ids = true_ids[keep]
      scores = {"seed": _scores(np.asarray(pred.ids[l])[keep], true_ids, trace["probs"].shape[-1])}
      if l >= 1 and "inputs" in trace:
        x = trace["inputs"][l - 1][keep]
        candidates = {}
        if routers is not None:
          candidates["pregate"] = predictor_lib.pregate_logits(x, routers[stack][l])
        if learned is not None and stack in learned:
          candidates["learned"] = predictor_lib.learned_logits(learned[stack][l - 1], x)
        bias = None if stack_biases is None else stack_biases[l]
        for kind, logits in candidates.items():
          ids = np.asarray(seed_predictor.select(jnp.asarray(logits), top_k, moe_cfg, bias))
          scores[kind] = _scores(ids, true_ids, trace["probs"].shape[-1])
      out[f"{stack}/{l}"] = scores
  return out


def _scores(predicted_ids: np.ndarray, true_ids: np.ndarray, num_experts: int) -> dict:
  """Hit rate, recall and load L1 error of predicted_ids <int>[T, k] vs true_ids <int>[T, k]."""
  found = (true_ids[:, :, None] == predicted_ids[:, None, :]).any(-1)
  load = lambda ids: np.bincount(ids.reshape(-1), minlength=num_experts)
  return {"hit": metrics.hit_rate(predicted_ids[:, 0], true_ids), "recall": float(found.mean()),
          "l1": metrics.load_l1_error(load(predicted_ids), load(true_ids))}


def table_lines(held_out: dict) -> list[str]:
  """The held-out scores as lines: layer, then hit / recall@k / load L1 per kind."""
  lines = []
  for layer, by_kind in held_out.items():
    cells = [f"{kind} {m['hit']:.3f} / {m['recall']:.3f} / {m['l1']:.3f}"
             for kind, m in by_kind.items()]
    lines.append(f"  {layer}: " + " | ".join(cells))
  return lines


# --- checkpoints ---------------------------------------------------------------------------------


def save_seed(path: str, seeds: dict, *, metadata: dict | None = None, force: bool = False):
  """Saves {stack: params} with orbax (plus a JSON manifest with `metadata`)."""
  from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
  return orbax_io.save_params(path, {"seed": seeds}, metadata=metadata, force=force)


def seed_template(layer_counts: dict, *, d_model: int, hidden: int, num_experts: int,
                  bidirectional: tuple[str, ...] = ()) -> dict:
  """The expected tree of a seed predictor: stack -> param shapes (`seed_predictor.init`; the
  stacks in `bidirectional` with a backward LSTM)."""
  return {stack: jax.eval_shape(lambda n=n, both=stack in bidirectional: seed_predictor.init(
      jax.random.key(0), d_model=d_model, hidden=hidden, num_layers=n, num_experts=num_experts,
      bidirectional=both))
          for stack, n in layer_counts.items()}


def restore_seed(path: str, *, template: dict | None = None) -> dict:
  """Restores {stack: params}; with `template` (`seed_template`) a checkpoint of another shape
  raises ValueError naming the tree paths and both shapes."""
  from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
  target = None if template is None else {"seed": template}
  try:
    return orbax_io.restore_params(path, target=target)["seed"]
  except ValueError as e:
    raise ValueError(f"{e}\nthe seed predictor in {path} was trained for another model (stacks, "
                     "MoE layers, width, experts), LSTM width or direction; retrain it for this "
                     "model: launch/train_seed_predictor.py --force.") from None


def restore_for_layers(path: str, moe_layers: dict) -> dict:
  """The seed predictor at `path` checked against a model's `family.moe_layers(params, cfg)`
  (the LSTM width and the bidirectional stacks are read from the checkpoint's metadata; a
  checkpoint that records no "bidirectional" is causal throughout)."""
  from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
  metadata = orbax_io.load_metadata(path) or {}
  hidden = metadata.get("hidden")
  if hidden is None:
    raise ValueError(f"{path} records no 'hidden' in its metadata: not a seed predictor saved "
                     "by launch/train_seed_predictor.py.")
  both = tuple(s for s, on in (metadata.get("bidirectional") or {}).items() if on)
  d_model, num_experts = next(iter(moe_layers.values()))[0]["router"].shape
  template = seed_template({s: len(v) for s, v in moe_layers.items()}, d_model=d_model,
                           hidden=hidden, num_experts=num_experts, bidirectional=both)
  return restore_seed(path, template=template)


# --- the job -------------------------------------------------------------------------------------


def _learned_or_none(job: Job) -> dict | None:
  """The per-token maps of config.predictor_checkpoint, to score beside seed; None (logged) if
  unset or unreadable: the seed predictor does not depend on them."""
  from moe_jax.app import predictor_training  # pylint: disable=import-outside-toplevel
  path = job.predictor_path
  if not job.predictor_checkpoint or not os.path.isdir(path):
    return None
  try:
    return predictor_training.restore_learned(path)
  except (ValueError, FileNotFoundError) as e:
    logging.warning("not scoring the learned predictor of %s: %s", path, e)
    return None


EVAL_BATCHES = 8   # held-out batches the predictor is scored on


def default_out_dir(job: Job) -> str:
  """<checkpoint dir>/seed_predictor."""
  return os.path.join(runtime.checkpoint_dir(job), "seed_predictor")


def train_on_pydoc(job: Job, out_dir: str, *, hidden: int, steps: int, num_batches: int,
                   batch_size: int = 32, log_every: int = 200, force: bool = False) -> dict:
  """Records traces on the pydoc train split, trains the seed predictor, scores it (and pregate /
  the learned map of config.predictor_checkpoint) on held-out batches, saves it to `out_dir`;
  returns its metadata."""
  from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(out_dir, orbax_io.MANIFEST_NAME)) and not force:
    raise UsageError(f"{out_dir} already holds a seed predictor; pass --force to retrain it.")
  model, tokenizer = runtime.load_model(job)
  if tokenizer is None:
    raise UsageError(f"{job.checkpoint} has no spiece.model to tokenise pydoc text.")
  family, cfg, params = job.family, model.config, model.params
  moe_cfg = family.moe_config(cfg, jnp.float32)
  moe_fn = DefaultMoE(moe_cfg, job.execution)

  def split(name, count, keep_inputs):
    windows = workflows.pydoc_windows(job, tokenizer, name)
    batches = data_lib.batches(windows, job.data.batch_size, seed=1)
    return record_traces(family, cfg, params, itertools.islice(batches, count), moe_fn,
                         keep_inputs=keep_inputs)

  start = time.time()
  traces = split("train", num_batches, False)
  both = bidirectional_stacks(family)
  seeds, losses = train_seed(traces, hidden=hidden, steps=steps, batch_size=batch_size,
                             seed=job.train.seed, log_every=log_every, bidirectional=both)
  train_seconds = time.time() - start
  layers = family.moe_layers(params, cfg)
  routers = {s: [np.asarray(ff["router"], np.float32) for ff in v] for s, v in layers.items()}
  biases = {s: [ff.get("router_bias") for ff in v] for s, v in layers.items()}
  if all(b is None for v in biases.values() for b in v):
    biases = None
  learned = _learned_or_none(job)
  held = split("held_out", EVAL_BATCHES, True)
  rule = moe_cfg if moe_cfg.router != "softmax" else None
  held_out = evaluate(held, seeds, top_k=moe_cfg.top_k, moe_cfg=rule, biases=biases,
                      routers=routers, learned=learned)
  tokens = lambda t: int(np.sum(next(iter(t.values()))["mask"]))
  metadata = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "checkpoint": job.checkpoint, "hidden": hidden,
              "bidirectional": {stack: stack in both for stack in seeds}, "steps": steps,
              "batch_size": batch_size, "tokens": tokens(traces), "held_out_tokens": tokens(held),
              "train_seconds": round(train_seconds, 1), "losses": losses, "held_out": held_out}
  save_seed(out_dir, seeds, metadata=metadata, force=force)
  return metadata
