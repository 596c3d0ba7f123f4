"""Training a model family from scratch on text windows: AdamW, warmup + cosine decay, logging.

The loss is the family's (`family.loss`: for Switch, HF's CE + z and aux router losses). Gradients
flow through `moe_apply` with the grouped-matmul backend the `moe_fn` hook's `ExecutionConfig`
names (every backend is differentiable; "dense", every expert over every row, is the slow
reference). On a mesh the params are replicated and each batch is split over the devices (the MoE
layers then exchange tokens over the 'expert' axis as in inference).

With a `replication.Replicator`, every step runs the model's MoE layers through a `StackRunner`
(one-layer-ahead replica placement) whose `ReplicationState` (the load history) is carried from
step to step; the router decides either way, so the losses and params equal those of training
without replicas up to float32 summation order (gradients of a replicated expert are summed over
its home and replica slots).
"""

from __future__ import annotations

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import replication as replication_lib


def train(family: types.ModuleType, cfg, train_data: dict, *, moe_fn, steps: int,
          batch_size: int, learning_rate: float = 3e-3, warmup: int = 100,
          weight_decay: float = 0.01, seed: int = 0, log_every: int = 50,
          eval_data: dict | None = None, eval_every: int = 0, params=None, mesh=None,
          replicator: replication_lib.Replicator | None = None):
  """Trains with AdamW (warmup + cosine decay); logs progress every `log_every` steps.

  Args:
    family: the model family (`moe_jax.models.<name>`): its `loss` and `init_params`.
    cfg: the model config.
    train_data: windows from `family.text_windows` (numpy).
    moe_fn: the sparse-FFN hook, e.g. `DefaultMoE(moe_cfg, ExecutionConfig(...), mesh)`; also
      scores `eval_data`.
    steps, batch_size, learning_rate, warmup, weight_decay, seed: optimisation knobs.
    log_every: absl-log loss/accuracy every this many steps.
    eval_data: optional held-out windows, scored at every log (`eval_every` > 0: at the logs of
      every eval_every-th step and the last).
    params: start from these instead of a random init.
    mesh: the ('data', 'expert') mesh the hook runs on (None: one device): params replicated,
      batches split over its devices.
    replicator: train with replicas (`replication.Replicator`, not resident: resident replicas
      would hold copies of last step's weights); None: `moe_fn` alone.

  Returns:
    (params, history): trained params (numpy) and a list of logged metric dicts ("seconds":
    wall time so far; "step_seconds": the train steps' share of it, evaluation left out).
  """
  if replicator is not None and replicator.config.resident:
    raise ValueError("training with resident replicas would run stale copies of last step's "
                     "weights; use ReplicationConfig(resident=False).")
  if params is None:
    params = family.init_params(cfg, seed)
  params = _place(jax.tree.map(jnp.asarray, params), mesh, P())
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=weight_decay))
  opt_state = _place(optimizer.init(params), mesh, P())
  state = (None if replicator is None
           else _place(replicator.init_state(family.moe_layers(params, cfg)), mesh, P()))
  # A step returns params, optimizer and replication state laid out as it got them (else XLA
  # picks, e.g., expert-sharded params, and the second step compiles again).
  layout = jax.tree.map(lambda a: a.sharding, (params, opt_state, state))
  step = _train_step(family, cfg, optimizer, moe_fn, replicator, layout)
  evaluate = jax.jit(lambda p, b: family.loss(p, cfg, b, moe_fn)[1])
  rng = np.random.default_rng(seed)
  num = len(train_data["input_ids"])
  history, start, step_seconds = [], time.time(), 0.0
  for i in range(steps):
    pick = rng.integers(0, num, size=batch_size)
    step_start = time.time()
    batch = _place({k: jnp.asarray(v[pick]) for k, v in train_data.items()}, mesh,
                   batch_spec(batch_size, mesh))
    params, opt_state, state, metrics = step(params, opt_state, state, batch)
    metrics = {k: float(v) for k, v in metrics.items()}     # waits for the step
    step_seconds += time.time() - step_start
    last = i + 1 == steps
    if (i + 1) % log_every == 0 or last:
      row = {"step": i + 1, **metrics, "seconds": time.time() - start,
             "step_seconds": step_seconds}
      if eval_data is not None and (eval_every <= 0 or (i + 1) % eval_every == 0 or last):
        scores = _mean_eval(evaluate, params, eval_data, batch_size)
        row.update(eval_ce=scores["ce"], eval_accuracy=scores["accuracy"])
      history.append(row)
      logging.info("step %d/%d  loss %.3f  ce %.3f  acc %.3f  aux %.3f%s  (%.0f s)", i + 1, steps,
                   row["loss"], row["ce"], row["accuracy"], row["aux_loss"],
                   f"  eval ce {row['eval_ce']:.3f} acc {row['eval_accuracy']:.3f}"
                   if "eval_ce" in row else "", row["seconds"])
  return jax.tree.map(np.asarray, params), history


def _train_step(family, cfg, optimizer, moe_fn, replicator, layout):
  """jit((params, opt_state, replication state or None, batch) -> (params, opt_state, state,
  metrics)): one AdamW step; with a `replicator`, the MoE layers run through a `StackRunner`
  made inside the differentiated loss, and its next state comes out beside the metrics.
  `layout`: the shardings of (params, opt_state, state) the step returns them in."""

  def loss(params, state, batch):
    if replicator is None:
      total, metrics = family.loss(params, cfg, batch, moe_fn)
      return total, (metrics, state)
    runner = replicator.runner(family.moe_layers(params, cfg), state)
    total, metrics = family.loss(params, cfg, batch, runner.moe_fn)
    metrics = dict(metrics, replica_rows=runner.replica_rows())
    return total, (metrics, runner.next_state())

  @jax.jit
  def step(params, opt_state, state, batch):
    (total, (metrics, state)), grads = jax.value_and_grad(loss, has_aux=True)(params, state,
                                                                               batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params, opt_state, state = jax.lax.with_sharding_constraint(
        (optax.apply_updates(params, updates), opt_state, state), layout)
    return params, opt_state, state, dict(metrics, loss=total)

  return step


def batch_spec(batch_size: int, mesh) -> P:
  """How a batch of `batch_size` rows is split: over all devices when it divides, else over the
  'data' axis when that divides, else replicated."""
  if mesh is None:
    return P()
  if batch_size % mesh.devices.size == 0:
    return P(("data", "expert"))
  return P("data") if batch_size % mesh.shape["data"] == 0 else P()


def _place(tree, mesh, spec: P):
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, spec))


def _mean_eval(evaluate, params, data, batch_size) -> dict:
  """{"ce", "accuracy"}: means over the whole batches of `data` (NaN if there is none)."""
  n = len(data["input_ids"]) - len(data["input_ids"]) % batch_size
  scores = [evaluate(params, {k: jnp.asarray(v[s:s + batch_size]) for k, v in data.items()})
            for s in range(0, n, batch_size)]
  return {key: float(np.mean([float(m[key]) for m in scores])) if scores else float("nan")
          for key in ("ce", "accuracy")}
