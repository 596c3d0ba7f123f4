"""The stack runner: threads each next MoE layer's `Replicas` through a forward.

A model hands every sparse FFN call to one hook, `moe_fn(stack, index, ff_params, x, routing)`.
`StackRunner.moe_fn` implements it: when MoE layer l of a stack runs, it first issues the
placement + prefetch of layer l + 1 from layer l's input `x` (so they depend on nothing that layer
l computes, and XLA may overlap them with it), then runs layer l with the placement issued one
layer earlier. The first MoE layer of a stack has no predecessor and uses `first_layer`
("history": the EMA of past batches' loads, or "none").

The runner is a trace-time helper: create one per forward pass inside the jitted function, call
the model, then return `runner.records()` and `runner.next_state()` from the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import collectives
from moe_jax import mesh as mesh_lib
from moe_jax import moe_layer
from moe_jax import placement
from moe_jax import predictor as predictor_lib
from moe_jax import replicas as replicas_lib
from moe_jax import routing as routing_lib
from moe_jax.config import ExecutionConfig, MoEConfig
from moe_jax.layer_records import LayerRecord, LayerSummary  # noqa: F401  (re-exported)
from moe_jax.replication_state import (  # noqa: F401  (re-exported)
    ReplicationConfig, ReplicationState, advance_calibration, calibrate, init_state,
    with_resident_replicas)


DYNAMIC_KINDS = predictor_lib.AHEAD


def policy_index(kind: str) -> int:
  """Index of a replicating predictor kind for `StackRunner(policy=...)` in dynamic mode."""
  if kind not in DYNAMIC_KINDS:
    raise ValueError(f"dynamic mode selects one of {DYNAMIC_KINDS}, got {kind!r}.")
  return DYNAMIC_KINDS.index(kind)


@dataclasses.dataclass(frozen=True)
class Replicator:
  """A hashable maker of `StackRunner`s, for a program that runs a model several times (e.g.
  generation: the prompt pass, then every decode step with the state carried in the loop).

    replicator = Replicator(config, moe_cfg, mesh, execution)
    state = replicator.init_state(layers)                  # outside or inside the loop
    runner = replicator.runner(layers, state)              # one per pass, inside jit
    out = model_pass(..., moe_fn=runner.moe_fn); state = runner.next_state()
  """

  config: ReplicationConfig
  moe_cfg: MoEConfig
  mesh: Any
  execution: ExecutionConfig = ExecutionConfig()

  def __post_init__(self):
    if self.config.predictor == "dynamic":
      raise ValueError("predictor='dynamic' selects the kind per call, which a Replicator does "
                       "not; use one kind, e.g. 'history', 'pregate' or 'learned'.")
    if self.config.predictor in predictor_lib.SEED_KINDS:
      raise ValueError(f"predictor={self.config.predictor!r} reads each pass's token embeddings "
                       "through "
                       "StackRunner(seed=...), which a Replicator's passes (generation) do not "
                       "feed; use StackRunner directly, or another kind.")

  def init_state(self, layers: dict, calibration: dict | None = None) -> ReplicationState:
    """A fresh state for `layers` (stack -> MoE params), with resident slots when configured
    and `calibration` (stack -> <f>[n, E] counts) for eplb."""
    state = init_state({s: len(p) for s, p in layers.items()}, self.moe_cfg.num_experts)
    if calibration is not None:
      state = calibrate(state, calibration)
    if self.config.resident and self.config.predictor != "none":
      state = with_resident_replicas(state, layers, self.moe_cfg, self.config.num_replica_slots,
                                     self.mesh)
    return state

  def empty_summaries(self, layers: dict, passes: int) -> dict:
    """stack -> zero `LayerSummary` of shape [passes, n layers, ...], for a loop to fill."""
    devices = mesh_lib.axis_sizes(self.mesh)
    return {stack: LayerSummary.zeros((passes, len(p)), self.moe_cfg.num_experts, devices)
            for stack, p in layers.items()}

  def runner(self, layers: dict, state: ReplicationState, learned: dict | None = None,
             oracle_loads: dict | None = None) -> "StackRunner":
    """A `StackRunner` for one pass; `oracle_loads` (stack -> <f32>[n, E] this pass's true
    loads, e.g. recorded by an earlier run of the same tokens) only for predictor='oracle'."""
    return StackRunner(self.config, self.moe_cfg, self.mesh, layers, state, learned=learned,
                       oracle_loads=oracle_loads, execution=self.execution)


@struct.dataclass
class _Placement:
  load: jax.Array
  top1: jax.Array
  replicas: replicas_lib.Replicas | None
  fetched: jax.Array


class StackRunner:
  """Implements the model's `moe_fn` hook with one-layer-ahead replica placement.

  Args:
    config: the `ReplicationConfig` (its `num_replica_slots` is r).
    moe_cfg: the MoE layers' config.
    mesh: the ('data', 'expert') mesh.
    layers: stack name -> list of that stack's MoE params in order (router + experts).
    state: `ReplicationState` from the previous batch (`init_state` at the start).
    learned: stack -> list of learned predictor params, entry j predicting layer j + 1.
    oracle_loads: stack -> <f32>[n, E] true loads of this batch (benchmarks only).
    seed: stack -> `moe_jax.seed_predictor.SeedPrediction` of this batch (predictor="seed"):
      every MoE layer's predicted experts, from the stack's token embeddings.
    policy: in "dynamic" mode, a traced int32 index into `DYNAMIC_KINDS` (see `policy_index`);
      needs `learned` and `oracle_loads` (and `seed` if it may select "seed").
    execution: how the layers run (`ExecutionConfig`; default: dropless).
  """

  def __init__(self, config: ReplicationConfig, moe_cfg: MoEConfig, mesh, layers: dict,
               state: ReplicationState, *, learned: dict | None = None,
               oracle_loads: dict | None = None, seed: dict | None = None,
               policy: jax.Array | None = None, execution: ExecutionConfig | None = None):
    _check_extras(config.predictor, learned, oracle_loads, seed, policy)
    self.config, self.moe_cfg, self.mesh = config, moe_cfg, mesh
    self.execution = execution if execution is not None else ExecutionConfig()
    self.layers, self.state = layers, state
    self.learned, self.oracle_loads, self.policy = learned, oracle_loads, policy
    self.seed = seed
    if config.resident and state.replicas is None and self.replicating:
      self.state = with_resident_replicas(state, layers, moe_cfg, config.num_replica_slots, mesh)
    self._pending: dict = {}
    self._records: dict = {stack: [] for stack in layers}
    self._held: dict = {stack: [] for stack in layers}     # Replicas or None per layer

  @property
  def replicating(self) -> bool:
    return self.config.predictor != "none" and self.config.num_replica_slots > 0

  @property
  def _in_layer(self) -> bool:
    kind = self.config.predictor
    return kind in predictor_lib.PREDICTORS and predictor_lib.PREDICTORS[kind].source == "in_layer"

  def moe_fn(self, stack: str, index: int, ff_params: dict, x: jax.Array,
             routing: routing_lib.Routing | None = None):
    """Runs MoE layer `index` of `stack` on x <f>[B, L, d]; returns (y, MoEStats)."""
    if self._in_layer or not self.config.exact:
      routing = self._layer_routing(stack, index, ff_params, x, routing)
    if self._in_layer:   # reactive: this layer's own routing places its replicas, here
      current = self._reactive(stack, index, routing, x)
    elif index == 0:
      current = self._first_placement(stack, x)
    else:
      current = self._pending.pop((stack, index))
    if not self._in_layer and index + 1 < len(self.layers[stack]):
      self._pending[(stack, index + 1)] = self._plan(stack, index + 1, x)
    if mesh_lib.is_cpu(self.mesh):  # the layer's collectives after the placements'
      current, x = self._after_placements(stack, index, current, x)
    y, stats = moe_layer.moe_apply(ff_params, x, self.moe_cfg, execution=self.execution,
                                   mesh=self.mesh, routing=routing, replicas=current.replicas)
    table = (current.replicas.slot_table if current.replicas is not None
             else _home_table(self.moe_cfg, 0, self.mesh))
    self._records[stack].append(LayerRecord(predicted_load=current.load,
                                            predicted_top1=current.top1, slot_table=table,
                                            fetched_bytes=current.fetched, stats=stats))
    self._held[stack].append(current.replicas)
    return y, stats

  def _layer_routing(self, stack, index, ff_params, x, routing):
    """The routing layer `index` runs with: the router's (given or computed here, as moe_apply
    would), or in the approximate mode the seed predictor's experts in its place."""
    if routing is None:
      routing = routing_lib.route(x.reshape(-1, x.shape[-1]).astype(self.moe_cfg.jnp_dtype),
                                  ff_params, self.moe_cfg)
    if self.config.exact:
      return routing
    return routing_lib.with_experts(routing, self.seed[stack].ids[index], self.moe_cfg)

  def _after_placements(self, stack, index, current, x):
    """x made to wait for this layer's and the next layer's placement + prefetch."""
    pending = self._pending.get((stack, index + 1))
    fields = lambda p: None if p is None else (p.load, p.top1, p.replicas, p.fetched)
    (now, nxt), x = collectives.in_order((fields(current), fields(pending)), x, enabled=True)
    if pending is not None:
      self._pending[(stack, index + 1)] = _Placement(*nxt)
    return _Placement(*now), x

  def records(self) -> dict:
    """stack -> list of `LayerRecord`, one per MoE layer run so far."""
    return self._records

  def summaries(self) -> dict:
    """stack -> `LayerSummary` of this pass's MoE layers, stacked on a leading [n] axis:
    fixed-size (no per-token arrays), so a loop can keep one per pass (e.g. decode steps)."""
    home = self.moe_cfg.num_experts // mesh_lib.axis_sizes(self.mesh)[1]
    return {stack: jax.tree.map(lambda *a: jnp.stack(a), *[r.summary(home) for r in records])
            for stack, records in self._records.items() if records}

  def replica_rows(self) -> jax.Array:
    """<int32>[] token-choices this pass computed in replica slots (all stacks and layers)."""
    return sum((jnp.sum(s.replica_rows) for s in self.summaries().values()),
               jnp.zeros((), jnp.int32))

  def next_state(self) -> ReplicationState:
    """The history updated with this pass's true loads, the EPLB calibration window advanced
    (and, if resident, the held replicas)."""
    history, true_loads = dict(self.state.history), {}
    for stack, records in self._records.items():
      if not records:
        continue
      true = jnp.stack([r.stats.tokens_per_expert for r in records]).astype(jnp.float32)
      old = history[stack][:len(records)]
      new = jax.vmap(predictor_lib.history_update, in_axes=(0, 0, None))(
          old, true, self.config.history_decay)
      history[stack] = history[stack].at[:len(records)].set(new)
      true_loads[stack] = jnp.zeros_like(history[stack]).at[:len(records)].set(true)
    state = advance_calibration(self.state.replace(history=history), true_loads,
                                self.config.eplb_refresh)
    if not (self.config.resident and self.replicating):
      return state
    replicas = {stack: list(held) for stack, held in self.state.replicas.items()}
    for stack, held in self._held.items():
      for index, entry in enumerate(held):
        if entry is not None:
          replicas[stack][index] = entry
    return state.replace(replicas=replicas)

  # --- placement -------------------------------------------------------------------------------

  def _first_placement(self, stack, x):
    """Layer 0 has no predecessor: kinds that read something other than an earlier layer (seed,
    eplb, oracle) use it; one-layer-ahead kinds use the history (`first_layer`)."""
    kind = self.config.predictor
    if not self.replicating:
      return _no_placement(self.moe_cfg, x)
    if kind == "dynamic":
      estimates = [self._first_estimate(k, stack, x) for k in DYNAMIC_KINDS]
      load, top1 = _select(self.policy, estimates)
      return self._placement(stack, 0, load, top1, self._placer())
    predictor = predictor_lib.PREDICTORS[kind]
    if (self.config.first_layer == "none" and not predictor.first
        and predictor.source in ("history", "hidden_state")):
      return _no_placement(self.moe_cfg, x)
    load, top1 = self._first_estimate(kind, stack, x)
    return self._placement(stack, 0, load, top1, predictor.placer)

  def _first_estimate(self, kind, stack, x):
    kind = predictor_lib.PREDICTORS[kind].first or kind
    source = predictor_lib.PREDICTORS[kind].source
    if source == "truth":
      return self.oracle_loads[stack][0], _no_top1(x)
    if source == "embedding":
      return self._seed_estimate(stack, 0, x)
    if source == "calibration":
      return self.state.calibration[stack][0], _no_top1(x)
    history = self.state.history[stack][0]
    if self.config.first_layer == "none":
      history = jnp.zeros_like(history)
    return history, _no_top1(x)

  def _seed_estimate(self, stack, index, x):
    if self.seed is None:   # dynamic mode without seed predictions: never selected (see policy)
      return jnp.zeros((self.moe_cfg.num_experts,), jnp.float32), _no_top1(x)
    prediction = self.seed[stack]
    return prediction.load[index].astype(jnp.float32), prediction.top1[index]

  def _plan(self, stack, index, x):
    """Placement + prefetch for layer `index` from the previous layer's input x."""
    if not self.replicating:
      return _no_placement(self.moe_cfg, x)
    next_layer = self.layers[stack][index]
    seed_load, seed_top1 = self._seed_estimate(stack, index, x)
    inputs = predictor_lib.LayerInputs(
        x=x.reshape(-1, x.shape[-1]), next_router=next_layer["router"],
        history=self.state.history[stack][index],
        learned=None if self.learned is None else self.learned[stack][index - 1],
        oracle=None if self.oracle_loads is None else self.oracle_loads[stack][index],
        next_bias=next_layer.get("router_bias"), seed_load=seed_load, seed_top1=seed_top1,
        calibration=self.state.calibration[stack][index], top_k=self.moe_cfg.top_k,
        moe_cfg=self.moe_cfg)
    if self.config.predictor == "dynamic":
      load, top1 = _select(self.policy, [predictor_lib.PREDICTORS[k].estimate(inputs)
                                         for k in DYNAMIC_KINDS])
      return self._placement(stack, index, load, top1, self._placer())
    kind = predictor_lib.PREDICTORS[self.config.predictor]
    load, top1 = kind.estimate(inputs)
    return self._placement(stack, index, load, top1, kind.placer)

  def _reactive(self, stack, index, routing, x):
    """Placement + fetch of layer `index` from its own router's counts (no prediction)."""
    if not self.replicating:
      return _no_placement(self.moe_cfg, x)
    load = routing.tokens_per_expert.astype(jnp.float32)
    return self._placement(stack, index, load, _no_top1(x), "greedy")

  def _placer(self):
    """Dynamic mode: a traced bool, True where the selected kind places with EPLB."""
    eplb = [k for k in DYNAMIC_KINDS if predictor_lib.PREDICTORS[k].placer == "eplb"]
    return jnp.isin(self.policy, jnp.asarray([DYNAMIC_KINDS.index(k) for k in eplb], jnp.int32))

  def _columns(self, stack, index, load, placer):
    """<int32>[De, r] replica columns for `load` by the greedy placement or EPLB (`placer`: a
    name, or in dynamic mode a traced bool selecting EPLB)."""
    from moe_jax import eplb as eplb_lib  # pylint: disable=import-outside-toplevel
    cfg, mesh, r = self.moe_cfg, self.mesh, self.config.num_replica_slots
    held = self.state.replicas[stack][index] if self.config.resident else None
    greedy = lambda: replicas_lib.place(load, cfg, num_replica_slots=r, mesh=mesh, previous=held,
                                        stickiness=self.config.stickiness)
    packed = lambda: eplb_lib.place(load, cfg, num_replica_slots=r, mesh=mesh,
                                    devices_per_node=self.config.devices_per_node)
    if isinstance(placer, str):
      return packed() if placer == "eplb" else greedy()
    return jnp.where(placer, packed(), greedy())

  def _placement(self, stack, index, load, top1, placer):
    params, cfg, mesh = self.layers[stack][index], self.moe_cfg, self.mesh
    columns = self._columns(stack, index, load, placer)
    if not self.config.resident:
      replicas = replicas_lib.prefetch(params, columns, cfg, mesh=mesh, execution=self.execution)
      fetched = replicas_lib.replica_bytes(columns, params) * mesh_lib.axis_sizes(mesh)[0]
    else:
      held = self.state.replicas[stack][index]
      replicas, fetched = replicas_lib.refresh(params, columns, held, cfg, mesh=mesh,
                                               execution=self.execution)
    return _Placement(load=load, top1=top1, replicas=replicas, fetched=fetched)


def _check_extras(kind, learned, oracle_loads, seed, policy):
  """ValueError naming what a predictor kind needs and was not given."""
  if kind == "dynamic" and (policy is None or learned is None or oracle_loads is None):
    raise ValueError("predictor='dynamic' needs policy=, learned= and oracle_loads=.")
  if kind in predictor_lib.LEARNED_KINDS and learned is None:
    raise ValueError(f"predictor={kind!r} needs learned predictor params: train them with "
                     "launch/train_predictor.py and pass them as learned=...")
  if kind == "oracle" and oracle_loads is None:
    raise ValueError("predictor='oracle' needs this batch's true loads (oracle_loads=...), "
                     "e.g. from a first pass with predictor='none'.")
  if kind in predictor_lib.SEED_KINDS and seed is None:
    raise ValueError(f"predictor={kind!r} needs this batch's seed predictions (seed=...: "
                     "moe_jax.seed_predictor.predict on the stacks' token embeddings).")


def _select(index, candidates):
  """candidates[index] for a traced index: every candidate is computed, one is kept.

  Deliberately not `lax.switch`: the estimators run on sharded tokens, so their branches would
  hold SPMD collectives, and XLA:CPU (jax 0.10.2) deadlocks such a conditional when the
  executable is loaded from the persistent compilation cache. The extra estimators are router-
  sized matmuls ([T, d] x [d, E]), small beside the experts.
  """
  return jax.tree.map(lambda *xs: jnp.stack(xs)[index], *candidates)


def _no_placement(cfg: MoEConfig, x):
  return _Placement(load=jnp.zeros((cfg.num_experts,)), top1=_no_top1(x), replicas=None,
                    fetched=jnp.zeros((), jnp.float32))


def _no_top1(x):
  return jnp.full((x.shape[0] * x.shape[1],), -1, jnp.int32)


def _home_table(cfg: MoEConfig, num_replica_slots: int, mesh):
  return placement.home_slot_table(cfg.num_experts, mesh.shape["expert"], num_replica_slots)
