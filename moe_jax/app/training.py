"""Training a model family from scratch on text windows: AdamW, warmup + cosine decay, logging.

The loss is the family's (`family.loss`: for Switch, HF's CE + z and aux router losses). Gradients
flow through `moe_apply`; its CPU `windowed` grouped matmul uses a data-dependent `while_loop`,
which reverse-mode autodiff cannot differentiate, so training uses the `dense` grouped-matmul
backend (every expert over its masked rows) unless told otherwise. That costs E x the expert FLOPs
and is meant for small models.
"""

from __future__ import annotations

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging


def train(family: types.ModuleType, cfg, train_data: dict, *, moe_fn, steps: int,
          batch_size: int, learning_rate: float = 3e-3, warmup: int = 100,
          weight_decay: float = 0.01, seed: int = 0, log_every: int = 50,
          eval_data: dict | None = None, params=None):
  """Trains with AdamW (warmup + cosine decay); logs progress every `log_every` steps.

  Args:
    family: the model family (`moe_jax.models.<name>`): its `loss` and `init_params`.
    cfg: the model config.
    train_data: windows from `family.text_windows` (numpy).
    moe_fn: the sparse-FFN hook, e.g. `DefaultMoE(moe_cfg, ExecutionConfig(gmm_backend="dense"))`.
    steps, batch_size, learning_rate, warmup, weight_decay, seed: optimisation knobs.
    log_every: absl-log loss/accuracy every this many steps.
    eval_data: optional held-out windows, scored at every log.
    params: start from these instead of a random init.

  Returns:
    (params, history): trained params (numpy) and a list of logged metric dicts.
  """
  if params is None:
    params = family.init_params(cfg, seed)
  params = jax.tree.map(jnp.asarray, params)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=weight_decay))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(family.loss, has_aux=True)(
        params, cfg, batch, moe_fn)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(metrics, loss=loss)

  evaluate = jax.jit(lambda p, b: family.loss(p, cfg, b, moe_fn)[1])
  rng = np.random.default_rng(seed)
  num = len(train_data["input_ids"])
  history, start = [], time.time()
  for i in range(steps):
    pick = rng.integers(0, num, size=batch_size)
    batch = {k: jnp.asarray(v[pick]) for k, v in train_data.items()}
    params, opt_state, metrics = step(params, opt_state, batch)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      row = {"step": i + 1, **{k: float(v) for k, v in metrics.items()},
             "seconds": time.time() - start}
      if eval_data is not None:
        scores = _mean_eval(evaluate, params, eval_data, batch_size)
        row.update(eval_ce=scores["ce"], eval_accuracy=scores["accuracy"])
      history.append(row)
      logging.info("step %d/%d  loss %.3f  ce %.3f  acc %.3f  aux %.3f%s  (%.0f s)", i + 1, steps,
                   row["loss"], row["ce"], row["accuracy"], row["aux_loss"],
                   f"  eval ce {row['eval_ce']:.3f} acc {row['eval_accuracy']:.3f}"
                   if "eval_ce" in row else "", row["seconds"])
  return jax.tree.map(np.asarray, params), history


def _mean_eval(evaluate, params, data, batch_size) -> dict:
  """{"ce", "accuracy"}: means over the whole batches of `data` (NaN if there is none)."""
  n = len(data["input_ids"]) - len(data["input_ids"]) % batch_size
  scores = [evaluate(params, {k: jnp.asarray(v[s:s + batch_size]) for k, v in data.items()})
            for s in range(0, n, batch_size)]
  return {key: float(np.mean([float(m[key]) for m in scores])) if scores else float("nan")
          for key in ("ce", "accuracy")}
