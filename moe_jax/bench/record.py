"""Recording routing traces (true and predicted per-layer expert loads) with the library.

  recorded = record.run_stack(params, cfg, batches, mesh=mesh)      # per-layer inputs + loads
  learned = record.train_learned(params, recorded_train)           # optional
  trace = record.to_trace(params, cfg, recorded, learned=learned, meta={...})
  sim.traces.save("trace.npz", trace)

The predicted loads are exactly what `replication.StackRunner` computes: layer l's pregate estimate
is layer l's router applied to layer l - 1's MoE input, counted over the top-k; learned uses the
trained map instead. True loads do not depend on placement (the real router decides), so one
plain pass per batch records everything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import mesh as mesh_lib
from moe_jax import predictor as predictor_lib
from moe_jax.app import predictor_training
from moe_jax.config import MoEConfig
from moe_jax.models import moe_stack
from moe_jax.moe_fn import DefaultMoE
from moe_jax.sim import traces as traces_lib


def layer_traces(params: dict, cfg: MoEConfig, h: jax.Array, *, mesh) -> tuple[list, list]:
  """The stack's plain forward on h <f>[B, L, d] (traceable: call it inside jit).

  Returns:
    ([x_l <f>[T, d]] every MoE layer's input, [probs_l <f32>[T, E]] its router probabilities).
  """
  recorder = predictor_training.TraceRecorder(DefaultMoE(cfg, mesh=mesh))
  moe_stack.forward(params, h, recorder.moe_fn)
  inputs, probs = recorder.traces()[moe_stack.STACK]
  return list(inputs), list(probs)


def run_stack(params: dict, cfg: MoEConfig, batches, *, mesh=None) -> list[dict]:
  """Runs the stack (home slots only) over `batches` (<f>[B, L, d] each).

  Returns:
    Per batch {"inputs": [<f32>[T, d]] per layer, "probs": [<f32>[T, E]] per layer}, numpy.
  """
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(1, 1)
  forward = jax.jit(lambda params, h: layer_traces(params, cfg, h, mesh=mesh))
  out = []
  for h in batches:
    inputs, probs = forward(params, jnp.asarray(h))
    out.append({"inputs": [np.asarray(x) for x in inputs], "probs": [np.asarray(p) for p in probs]})
  return out


def train_learned(params: dict, recorded: list[dict], **kwargs) -> list:
  """Learned predictors (one per layer pair) trained on recorded batches (`run_stack` output)."""
  traces = {moe_stack.STACK: ([np.concatenate([r["inputs"][l] for r in recorded])
                               for l in range(len(recorded[0]["inputs"]))],
                              [np.concatenate([r["probs"][l] for r in recorded])
                               for l in range(len(recorded[0]["probs"]))])}
  routers = {moe_stack.STACK: [layer["moe"]["router"] for layer in params["layers"]]}
  return predictor_training.train_learned(traces, routers, **kwargs)[moe_stack.STACK]


def to_trace(params: dict, cfg: MoEConfig, recorded: list[dict], *, learned: list | None = None,
             meta: dict | None = None) -> traces_lib.Trace:
  """A `Trace` with true loads and pregate (and learned) predictions for every layer >= 1."""
  routers = [np.asarray(layer["moe"]["router"]) for layer in params["layers"]]
  true, pregate, learned_loads = [], [], []
  for batch in recorded:
    xs, probs = batch["inputs"], batch["probs"]
    true.append([_counts(p, cfg.top_k) for p in probs])
    zeros = np.zeros((cfg.num_experts,), np.float32)
    pregate.append([zeros] + [_counts(predictor_lib.pregate_logits(xs[l - 1], routers[l]),
                                      cfg.top_k) for l in range(1, len(xs))])
    if learned is not None:
      learned_loads.append([zeros] + [_counts(predictor_lib.learned_logits(learned[l - 1],
                                                                           xs[l - 1]), cfg.top_k)
                                      for l in range(1, len(xs))])
  predicted = {"pregate": np.array(pregate)}
  if learned is not None:
    predicted["learned"] = np.array(learned_loads)
  return traces_lib.Trace(true_load=np.array(true), predicted=predicted,
                          tokens_per_step=int(recorded[0]["inputs"][0].shape[0]),
                          top_k=cfg.top_k, meta=dict(meta or {}))


def true_loads(probs: list, top_k: int) -> jax.Array:
  """<f32>[L, E] token-choices per expert of every layer from its router probabilities."""
  return jnp.stack([predictor_lib.choice_counts(p, top_k) for p in probs])


def _counts(logits, top_k):
  return np.asarray(predictor_lib.choice_counts(jnp.asarray(logits), top_k))
