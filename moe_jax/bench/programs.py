"""The compiled programs the main job runs each policy through, one set per capacity mode.

  none      no replica slots at all (the baseline; its true loads feed `oracle`);
  dynamic   one program for every kind placed ahead of its layer (history, pregate, learned,
            seed, eplb, oracle, ...): the kind is a traced index, so they share a compilation and
            differ only in where replicas go;
  reactive  its own program: each layer places from its own router output, the fetch in the layer;
  approx    the source paper's approximate mode (seed predictions replace the routers), run
            through the family's loss so the quality it keeps is measured; `none` gets the same
            loss program for the exact reference.

Every program takes (params, batch, state, extras) and returns (output, records, next state);
the loss programs' output is the family's metrics dict ("ce", "accuracy", ...).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import distributed, replication
from moe_jax import seed_predictor as seed_lib
from moe_jax.config import ExecutionConfig

APPROX = "seed_approx"      # the approximate mode's row in the report (not a predictor kind)


def seed_predictions(setup, params, batch, seed_params) -> dict:
  """stack -> `SeedPrediction` of every MoE layer from the stack's token embeddings."""
  layers = setup.family.moe_layers(params, setup.model_cfg)
  embedded = setup.family.token_embeddings(params, setup.model_cfg, batch)
  moe_cfg = setup.moe_cfg if setup.moe_cfg.router != "softmax" else None
  out = {}
  for stack, (embeddings, mask) in embedded.items():
    biases = [layer.get("router_bias") for layer in layers[stack]]
    out[stack] = seed_lib.predict(seed_params[stack], embeddings, mask, top_k=setup.moe_cfg.top_k,
                                  moe_cfg=moe_cfg, biases=None if biases[0] is None else biases)
  return out


def _program(setup, execution: ExecutionConfig, rcfg: replication.ReplicationConfig, *,
             loss: bool = False):
  """jit(params, batch, state, extras) -> (logits or loss metrics, records, next state)."""
  family, model_cfg, mesh, moe_cfg = setup.family, setup.model_cfg, setup.mesh, setup.moe_cfg

  @jax.jit
  def run(params, batch, state, extras):
    extras = dict(extras)
    seed_params = extras.pop("seed_params", None)
    if seed_params is not None:
      extras["seed"] = seed_predictions(setup, params, batch, seed_params)
    layers = family.moe_layers(params, model_cfg)
    runner = replication.StackRunner(rcfg, moe_cfg, mesh, layers, state, execution=execution,
                                     **extras)
    if loss:
      out = family.loss(params, model_cfg, batch, runner.moe_fn)[1]
    else:
      out = family.forward_batch(params, model_cfg, batch, runner.moe_fn)
    return out, runner.records(), runner.next_state()

  return run


class Stepper:
  """One forward of one capacity mode under a policy (see the module docstring). Each program
  compiles on its first call only, so policies a run does not use cost nothing."""

  def __init__(self, setup, execution: ExecutionConfig):
    self.setup = setup
    self.counts = {s: len(layers) for s, layers in setup.layers.items()}
    moe_cfg, rcfg = setup.moe_cfg, setup.replication_cfg
    exact = dataclasses.replace(rcfg, route_by="router")
    self.none_fn = _program(setup, execution, replication.ReplicationConfig(predictor="none"))
    self.dynamic_fn = _program(setup, execution, dataclasses.replace(exact, predictor="dynamic"))
    self.reactive_fn = _program(setup, execution, dataclasses.replace(exact, predictor="reactive"))
    self.none_loss_fn = _program(setup, execution,
                                 replication.ReplicationConfig(predictor="none"), loss=True)
    self.approx_fn = _program(setup, execution, dataclasses.replace(
        rcfg, predictor="seed", route_by="prediction"), loss=True)
    self.learned = setup.learned
    if self.learned is None:   # keeps the dynamic program's shapes; "learned" is never selected
      self.learned = {s: [{"w": jnp.zeros((moe_cfg.d_model, moe_cfg.num_experts)),
                           "b": jnp.zeros((moe_cfg.num_experts,))} for _ in range(n - 1)]
                      for s, n in self.counts.items()}

  def initial_state(self, calibration: dict | None = None):
    """Laid out on the mesh as the programs return it (so the next call hits the same program);
    `calibration` (stack -> [n, E] counts) calibrates eplb."""
    state = replication.init_state(self.counts, self.setup.moe_cfg.num_experts)
    if calibration is not None:
      state = replication.calibrate(state, calibration)
    return distributed.from_host(jax.tree.map(np.asarray, state), self.setup.mesh)

  def calibrated(self, state, calibration: dict):
    """`state` with eplb's calibration counts replaced (placed like `initial_state`)."""
    state = replication.calibrate(jax.tree.map(np.asarray, distributed.gather(state)),
                                  calibration)
    return distributed.from_host(jax.tree.map(np.asarray, state), self.setup.mesh)

  def true_loads(self, records) -> dict:
    """stack -> <f32>[n, E] the true loads of a pass's records."""
    return {s: jnp.stack([r.stats.tokens_per_expert for r in records[s]]).astype(jnp.float32)
            for s in self.counts}

  def __call__(self, policy, batch, state, oracle):
    """(output, records, next state) of one pass; output: logits, or the loss metrics for the
    approximate mode (`quality`)."""
    params = self.setup.params
    if policy == "none":
      return self.none_fn(params, batch, state, {})
    if policy == "reactive":
      return self.reactive_fn(params, batch, state, {})
    if policy == APPROX:
      return self.approx_fn(params, batch, state, {"seed_params": self.setup.seed})
    extras = dict(learned=self.learned, oracle_loads=oracle,
                  policy=jnp.int32(replication.policy_index(policy)))
    if self.setup.seed is not None:
      extras["seed_params"] = self.setup.seed
    return self.dynamic_fn(params, batch, state, extras)

  def quality(self, batch, state) -> dict:
    """The exact model's loss metrics on `batch` (the approximate mode's reference)."""
    return self.none_loss_fn(self.setup.params, batch, state, {})[0]
