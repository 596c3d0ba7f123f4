"""How replicas are placed (`ReplicationConfig`) and what carries over between batches
(`ReplicationState`: the load history, EPLB's calibration counts, resident replicas).

`moe_jax.replication` re-exports every name here; the stack runner lives there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moe_jax import predictor as predictor_lib
from moe_jax import replicas as replicas_lib
from moe_jax.config import MoEConfig

ROUTE_BY = ("router", "prediction")


@dataclasses.dataclass(frozen=True)
class ReplicationConfig:
  """How replicas are placed.

  Attributes:
    predictor: "none" or a kind of `predictor.PREDICTORS` ("history", "pregate", "learned",
      "seed", "eplb", "reactive", "oracle": benchmarks only); or "dynamic": the kind is a traced
      argument (`StackRunner(policy=...)`, an index into `DYNAMIC_KINDS`), so one compiled
      program serves every kind placed ahead of its layer (all but "reactive").
    num_replica_slots: r, spare slots per device on the `expert` axis that can hold replicas of
      hot experts (0 = no replication).
    first_layer: placement of each stack's first MoE layer for the one-layer-ahead kinds, which
      have no earlier layer to predict it from: "history" or "none".
    history_decay: EMA decay of the per-layer load history.
    resident: keep each layer's replicas between batches (in `ReplicationState`) and fetch only
      the slots whose expert changed (`replicas.refresh`), instead of every slot every batch.
    stickiness: with `resident`, keep the held table unless a new one lowers the expected max
      device load by more than this fraction (`placement.place`): trades balance for traffic.
    route_by: "router" (exact: the layer's router decides every token) or "prediction"
      (APPROXIMATE, the source paper's mode, only with predictor="seed": the seed predictor's
      experts replace the router's choice, so outputs differ from the model's).
    eplb_refresh: eplb: every this many batches the calibration counts are replaced by the
      true counts of those batches (0: never; the counts `calibrate` set stay).
    devices_per_node: eplb: devices of the expert axis per node (hierarchical packing), or None.
  """

  predictor: str = "none"
  num_replica_slots: int = 2
  first_layer: str = "history"
  history_decay: float = 0.8
  resident: bool = False
  stickiness: float = 0.0
  route_by: str = "router"
  eplb_refresh: int = 0
  devices_per_node: int | None = None

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
    self._check_modes()

  def _check_modes(self):
    if self.route_by not in ROUTE_BY:
      raise ValueError(f"route_by={self.route_by!r} is not one of {ROUTE_BY}.")
    if self.route_by == "prediction" and self.predictor != "seed":
      raise ValueError("route_by='prediction' (approximate: predicted experts replace the "
                       "router) needs predictor='seed', the predictor of every layer's experts.")
    if (not isinstance(self.eplb_refresh, int) or isinstance(self.eplb_refresh, bool)
        or self.eplb_refresh < 0):
      raise ValueError(f"eplb_refresh={self.eplb_refresh!r} must be an int >= 0 (batches "
                       "between EPLB re-placements; 0 = never).")
    if self.devices_per_node is not None and (
        not isinstance(self.devices_per_node, int) or self.devices_per_node < 1):
      raise ValueError(f"devices_per_node={self.devices_per_node!r} must be None or an int >= 1.")

  @property
  def exact(self) -> bool:
    """False only in the approximate mode, whose outputs are not the model's."""
    return self.route_by == "router"


@struct.dataclass
class ReplicationState:
  """What carries over between batches.

  Attributes:
    history: stack -> <f32>[num MoE layers, E] load EMA.
    calibration: stack -> <f32>[num MoE layers, E] the counts `eplb` places from (`calibrate`;
      replaced every `eplb_refresh` batches by `window`).
    window: stack -> <f32>[num MoE layers, E] true counts since the last EPLB refresh.
    batches: <int32>[] batches seen (passes of the stack runner).
    replicas: resident replicas only: stack -> per MoE layer the held `replicas.Replicas` (None
      until the first batch, or `with_resident_replicas`).
  """

  history: dict
  calibration: dict
  window: dict
  batches: jax.Array
  replicas: dict | None = None

  @property
  def tables(self) -> dict | None:
    """Resident replicas only: stack -> <int32>[num MoE layers, De, h + r] the held slot tables."""
    if self.replicas is None:
      return None
    return {stack: jnp.stack([r.slot_table for r in held]) for stack, held in self.replicas.items()}


def init_state(layer_counts: dict, num_experts: int) -> ReplicationState:
  """A fresh state: empty history and calibration for stack -> number of MoE layers."""
  zeros = lambda: {stack: jnp.zeros((n, num_experts), jnp.float32)
                   for stack, n in layer_counts.items()}
  return ReplicationState(history=zeros(), calibration=zeros(), window=zeros(),
                          batches=jnp.zeros((), jnp.int32))


def calibrate(state: ReplicationState, counts: dict) -> ReplicationState:
  """`state` whose EPLB calibration is `counts` (stack -> <f>[num MoE layers, E] per-expert
  token-choice counts, e.g. `moe_jax.expert_counts.load(path)` or a calibration run's true
  loads); the refresh window restarts."""
  calibration = {}
  for stack, old in state.calibration.items():
    if stack not in counts:
      raise ValueError(f"calibration counts have no stack {stack!r} (they have "
                       f"{sorted(counts)}).")
    new = np.asarray(counts[stack], np.float32)
    if new.shape != tuple(old.shape):
      raise ValueError(f"calibration counts of stack {stack!r} have shape {new.shape}; the model "
                       f"has {tuple(old.shape)} (MoE layers, experts).")
    if not np.all(np.isfinite(new)) or np.any(new < 0):
      raise ValueError(f"calibration counts of stack {stack!r} must be finite and >= 0.")
    calibration[stack] = jnp.asarray(new)
  return state.replace(calibration=calibration,
                       window=jax.tree.map(jnp.zeros_like, state.window))


def advance_calibration(state: ReplicationState, true_loads: dict,
                        refresh: int) -> ReplicationState:
  """One more batch: its true loads (stack -> <f32>[n, E]) join the window; every `refresh`
  batches (> 0) the window becomes the calibration and restarts."""
  batches = state.batches + 1
  window = {s: state.window[s] + true_loads.get(s, jnp.zeros_like(w))
            for s, w in state.window.items()}
  if refresh <= 0:
    return state.replace(window=window, batches=batches)
  due = (batches % refresh) == 0
  calibration = {s: jnp.where(due, window[s], c) for s, c in state.calibration.items()}
  window = {s: jnp.where(due, jnp.zeros_like(w), w) for s, w in window.items()}
  return state.replace(calibration=calibration, window=window, batches=batches)


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
