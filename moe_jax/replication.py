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


@dataclasses.dataclass(frozen=True)
class ReplicationConfig:
  """How replicas are placed.

  Attributes:
    predictor: "none" or a kind of `predictor.PREDICTORS` ("history", "pregate", "learned",
      "oracle": benchmarks only); or "dynamic": the kind is a traced argument
      (`StackRunner(policy=...)`, an index into `DYNAMIC_KINDS`), so one compiled program serves
      every replicating predictor.
    num_replica_slots: r, spare slots per device on the `expert` axis that can hold replicas of
      hot experts (0 = no replication).
    first_layer: placement of each stack's first MoE layer: "history" or "none".
    history_decay: EMA decay of the per-layer load history.
    resident: keep each layer's replicas between batches (in `ReplicationState`) and fetch only
      the slots whose expert changed (`replicas.refresh`), instead of every slot every batch.
    stickiness: with `resident`, keep the held table unless a new one lowers the expected max
      device load by more than this fraction (`placement.place`): trades balance for traffic.
  """

  predictor: str = "none"
  num_replica_slots: int = 2
  first_layer: str = "history"
  history_decay: float = 0.8
  resident: bool = False
  stickiness: float = 0.0

  def __post_init__(self):
    if self.predictor != "dynamic":
      predictor_lib.check_kind(self.predictor)
    if (not isinstance(self.num_replica_slots, int) or isinstance(self.num_replica_slots, bool)
        or self.num_replica_slots < 0):
      raise ValueError(f"num_replica_slots={self.num_replica_slots!r} must be an int >= 0.")
    if self.first_layer not in ("history", "none"):
      raise ValueError(f"first_layer={self.first_layer!r}: use 'history' or 'none'.")
    if not 0.0 <= self.history_decay < 1.0:
      raise ValueError(f"history_decay={self.history_decay} must be in [0, 1).")
    if not 0.0 <= self.stickiness < 1.0:
      raise ValueError(f"stickiness={self.stickiness} must be in [0, 1).")
    if self.stickiness > 0 and not self.resident:
      raise ValueError("stickiness > 0 keeps the previous batch's table, which only resident "
                       "replicas remember: set resident=True as well.")


DYNAMIC_KINDS = predictor_lib.REPLICATING


def policy_index(kind: str) -> int:
  """Index of a replicating predictor kind for `StackRunner(policy=...)` in dynamic mode."""
  if kind not in DYNAMIC_KINDS:
    raise ValueError(f"dynamic mode selects one of {DYNAMIC_KINDS}, got {kind!r}.")
  return DYNAMIC_KINDS.index(kind)


@struct.dataclass
class ReplicationState:
  """What carries over between batches.

  Attributes:
    history: stack -> <f32>[num MoE layers, E] load EMA.
    replicas: resident replicas only: stack -> per MoE layer the held `replicas.Replicas` (None
      until the first batch, or `with_resident_replicas`).
  """

  history: dict
  replicas: dict | None = None

  @property
  def tables(self) -> dict | None:
    """Resident replicas only: stack -> <int32>[num MoE layers, De, h + r] the held slot tables."""
    if self.replicas is None:
      return None
    return {stack: jnp.stack([r.slot_table for r in held]) for stack, held in self.replicas.items()}


def init_state(layer_counts: dict, num_experts: int) -> ReplicationState:
  return ReplicationState(history={stack: jnp.zeros((n, num_experts), jnp.float32)
                                   for stack, n in layer_counts.items()})


def with_resident_replicas(state: ReplicationState, layers: dict, moe_cfg: MoEConfig,
                           num_replica_slots: int, mesh) -> ReplicationState:
  """`state` holding r empty replica slots for every MoE layer of `layers` (stack -> params).

  Optional for `ReplicationConfig(resident=True)`: without it the first batch starts from empty
  slots all the same, but the state's structure changes after it (one more compilation).
  """
  del moe_cfg  # the layers' params say E
  return state.replace(
      replicas={s: [replicas_lib.empty_replicas(q, num_replica_slots, mesh=mesh) for q in p]
                for s, p in layers.items()})


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
                       "not; use 'history', 'pregate', 'learned' or (benchmarks) 'oracle'.")

  def init_state(self, layers: dict) -> ReplicationState:
    """A fresh state for `layers` (stack -> MoE params), with resident slots when configured."""
    state = init_state({s: len(p) for s, p in layers.items()}, self.moe_cfg.num_experts)
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
    policy: in "dynamic" mode, a traced int32 index into `DYNAMIC_KINDS` (see `policy_index`);
      needs both `learned` and `oracle_loads`.
    execution: how the layers run (`ExecutionConfig`; default: dropless).
  """

  def __init__(self, config: ReplicationConfig, moe_cfg: MoEConfig, mesh, layers: dict,
               state: ReplicationState, *, learned: dict | None = None,
               oracle_loads: dict | None = None, policy: jax.Array | None = None,
               execution: ExecutionConfig | None = None):
    if config.predictor == "dynamic" and (policy is None or learned is None
                                          or oracle_loads is None):
      raise ValueError("predictor='dynamic' needs policy=, learned= and oracle_loads=.")
    if config.predictor == "learned" and learned is None:
      raise ValueError("predictor='learned' needs learned predictor params: train them with "
                       "launch/train_predictor.py and pass them as learned=...")
    if config.predictor == "oracle" and oracle_loads is None:
      raise ValueError("predictor='oracle' needs this batch's true loads (oracle_loads=...), "
                       "e.g. from a first pass with predictor='none'.")
    self.config, self.moe_cfg, self.mesh = config, moe_cfg, mesh
    self.execution = execution if execution is not None else ExecutionConfig()
    self.layers, self.state = layers, state
    self.learned, self.oracle_loads, self.policy = learned, oracle_loads, policy
    if config.resident and state.replicas is None and self.replicating:
      self.state = with_resident_replicas(state, layers, moe_cfg, config.num_replica_slots, mesh)
    self._pending: dict = {}
    self._records: dict = {stack: [] for stack in layers}
    self._held: dict = {stack: [] for stack in layers}     # Replicas or None per layer

  @property
  def replicating(self) -> bool:
    return self.config.predictor != "none" and self.config.num_replica_slots > 0

  def moe_fn(self, stack: str, index: int, ff_params: dict, x: jax.Array,
             routing: routing_lib.Routing | None = None):
    """Runs MoE layer `index` of `stack` on x <f>[B, L, d]; returns (y, MoEStats)."""
    if index == 0:
      current = self._first_placement(stack, x)
    else:
      current = self._pending.pop((stack, index))
    if index + 1 < len(self.layers[stack]):
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
    """The history updated with this pass's true loads (and, if resident, the held replicas)."""
    history = dict(self.state.history)
    for stack, records in self._records.items():
      if not records:
        continue
      true = jnp.stack([r.stats.tokens_per_expert for r in records]).astype(jnp.float32)
      old = history[stack][:len(records)]
      new = jax.vmap(predictor_lib.history_update, in_axes=(0, 0, None))(
          old, true, self.config.history_decay)
      history[stack] = history[stack].at[:len(records)].set(new)
    if not (self.config.resident and self.replicating):
      return self.state.replace(history=history)
    replicas = {stack: list(held) for stack, held in self.state.replicas.items()}
    for stack, held in self._held.items():
      for index, entry in enumerate(held):
        if entry is not None:
          replicas[stack][index] = entry
    return self.state.replace(history=history, replicas=replicas)

  # --- placement -------------------------------------------------------------------------------

  def _first_placement(self, stack, x):
    """Layer 0 has no predecessor: the history (or, for the oracle, its true load)."""
    kind = self.config.predictor
    if not self.replicating or (self.config.first_layer == "none" and kind != "oracle"):
      return _no_placement(self.moe_cfg, x)
    history = lambda: (self.state.history[stack][0], _no_top1(x))
    oracle = lambda: (self.oracle_loads[stack][0], _no_top1(x))
    if kind == "dynamic":
      is_oracle = (self.policy == DYNAMIC_KINDS.index("oracle")).astype(jnp.int32)
      load, top1 = _select(is_oracle, [history(), oracle()])
    else:
      load, top1 = oracle() if kind == "oracle" else history()
    return self._placement(stack, 0, load, top1)

  def _plan(self, stack, index, x):
    """Placement + prefetch for layer `index` from the previous layer's input x."""
    if not self.replicating:
      return _no_placement(self.moe_cfg, x)
    next_layer = self.layers[stack][index]
    inputs = predictor_lib.LayerInputs(
        x=x.reshape(-1, x.shape[-1]), next_router=next_layer["router"],
        history=self.state.history[stack][index],
        learned=None if self.learned is None else self.learned[stack][index - 1],
        oracle=None if self.oracle_loads is None else self.oracle_loads[stack][index],
        next_bias=next_layer.get("router_bias"), top_k=self.moe_cfg.top_k,
        moe_cfg=self.moe_cfg)
    if self.config.predictor == "dynamic":
      load, top1 = _select(self.policy, [predictor_lib.PREDICTORS[k].estimate(inputs)
                                         for k in DYNAMIC_KINDS])
    else:
      load, top1 = predictor_lib.PREDICTORS[self.config.predictor].estimate(inputs)
    return self._placement(stack, index, load, top1)

  def _placement(self, stack, index, load, top1):
    params, cfg, mesh = self.layers[stack][index], self.moe_cfg, self.mesh
    r = self.config.num_replica_slots
    if not self.config.resident:
      columns = replicas_lib.place(load, cfg, num_replica_slots=r, mesh=mesh)
      replicas = replicas_lib.prefetch(params, columns, cfg, mesh=mesh, execution=self.execution)
      fetched = replicas_lib.replica_bytes(columns, params) * mesh_lib.axis_sizes(mesh)[0]
    else:
      held = self.state.replicas[stack][index]
      columns = replicas_lib.place(load, cfg, num_replica_slots=r, mesh=mesh, previous=held,
                                   stickiness=self.config.stickiness)
      replicas, fetched = replicas_lib.refresh(params, columns, held, cfg, mesh=mesh,
                                               execution=self.execution)
    return _Placement(load=load, top1=top1, replicas=replicas, fetched=fetched)


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
