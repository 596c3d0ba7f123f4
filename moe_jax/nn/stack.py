"""One-layer-ahead replica placement across the MoE layers of a user's own Flax model.

`replication.StackRunner` needs every MoE layer's params when it starts (at layer l it places
and prefetches layer l + 1 from layer l's input), so a model makes one `StackReplication` per
forward, from its MoE layers in call order, and hands it to each of them:

  class Model(nnx.Module):
    def __call__(self, x, state):
      ctx = moe_jax.nn.StackReplication.of([self.moe1, self.moe2], state)
      x = x + self.moe1(self.norm1(x), replication=ctx)[0]
      x = x + self.moe2(self.norm2(x), replication=ctx)[0]
      return x, ctx.next_state()      # carry the state to the next step

The `ReplicationState` (the load history) is the caller's to carry between steps: start from
`StackReplication.init_state(num_layers, num_experts)`. The router decides either way: with an
exact policy the output equals that of the same layers without replicas.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from moe_jax import replication as replication_lib
from moe_jax import routing as routing_lib
from moe_jax.config import ExecutionConfig, MoEConfig

STACK = "moe"     # the runner's stack name for a Flax model's MoE layers


class StackReplication:
  """Runs a model's MoE layers through one `replication.StackRunner` (one per forward pass).

  Args:
    layers: per MoE layer, in the order the model calls them, its params dict
      (`init_moe_params` layout) or a module with `moe_params()`.
    state: the previous step's `ReplicationState` (None: a fresh one).
    replication: the `ReplicationConfig` (predictor, replica slots, history decay).
    moe_config, mesh, execution: shared by all the layers.
    learned: predictor="learned" only: per layer pair j -> j + 1, the learned predictor params.
  """

  def __init__(self, layers: Sequence, state: replication_lib.ReplicationState | None = None, *,
               replication: replication_lib.ReplicationConfig, moe_config: MoEConfig, mesh,
               execution: ExecutionConfig | None = None, learned: Sequence | None = None):
    if not layers:
      raise ValueError("StackReplication needs the model's MoE layers (at least one), in the "
                       "order the model calls them.")
    if state is None:
      state = self.init_state(len(layers), moe_config.num_experts)
    params = [m if isinstance(m, dict) else m.moe_params() for m in layers]
    self._order = list(layers)
    self.runner = replication_lib.StackRunner(
        replication, moe_config, mesh, {STACK: params}, state, execution=execution,
        learned=None if learned is None else {STACK: list(learned)})
    self._next = 0

  @classmethod
  def of(cls, modules: Sequence, state=None, **kwargs) -> "StackReplication":
    """From MoE modules (NNX `MoELayer`s) that share one config, mesh and execution."""
    if not modules:
      raise ValueError("StackReplication.of needs the model's MoE layers (at least one).")
    first, keys = modules[0], ("moe_config", "mesh", "execution", "replication")
    if any(getattr(m, k) != getattr(first, k) for m in modules for k in keys):
      raise ValueError("StackReplication.of: the MoE layers differ in moe_config, mesh, "
                       "execution or replication; one stack shares them (build two contexts).")
    if first.replication is None:
      raise ValueError("the MoE layers have replication=None; pass ReplicationConfig(...) to "
                       "their constructors to run them with replicas.")
    return cls(modules, state, **{k: getattr(first, k) for k in keys}, **kwargs)

  @staticmethod
  def init_state(num_layers: int, num_experts: int) -> replication_lib.ReplicationState:
    """A fresh state (zero load history) for `num_layers` MoE layers of `num_experts`."""
    return replication_lib.init_state({STACK: num_layers}, num_experts)

  def index_of(self, module: Any) -> int:
    for i, entry in enumerate(self._order):
      if entry is module:
        return i
    raise ValueError("this MoE layer is not one of the StackReplication's layers; build it "
                     "from every MoE layer the model calls, or pass index= explicitly.")

  def __call__(self, index: int, params: dict, x: jax.Array,
               routing: routing_lib.Routing | None = None):
    """Runs MoE layer `index` on x <f>[B, L, d] with its placed replicas: (y, MoEStats)."""
    if index != self._next:
      raise ValueError(f"MoE layer {index} ran, but layer {self._next} is next: a "
                       "StackReplication runs its layers once each, in the order given.")
    self._next += 1
    return self.runner.moe_fn(STACK, index, params, x, routing)

  def next_state(self) -> replication_lib.ReplicationState:
    """The state to carry into the next step (history updated with this pass's loads)."""
    return self.runner.next_state()

  def records(self) -> list:
    """One `LayerRecord` per MoE layer run so far (predicted load, slot table, stats)."""
    return self.runner.records()[STACK]
