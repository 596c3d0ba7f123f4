"""The one hook through which a model runs its MoE layers.

A model never calls `moe_apply` itself: every sparse FFN goes through

  y, stats = moe_fn(stack, index, ff_params, x, routing)

where `stack` names a stack of MoE layers (a family's choice, e.g. one per encoder/decoder),
`index` is the MoE layer's position in it, `ff_params` its params, `x` <f>[B, L, d] its
(normalised) input and `routing` an optional precomputed `Routing` (None: the layer's router).
`DefaultMoE` runs home slots only; `replication.StackRunner.moe_fn` adds one-layer-ahead replica
placement; `app.predictor_training.TraceRecorder` records routing traces. A model written against
the hook runs under all of them unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax

from moe_jax import moe_layer
from moe_jax import routing as routing_lib
from moe_jax.config import ExecutionConfig, MoEConfig


class MoEFn(Protocol):
  """(stack, index, ff_params, x <f>[B, L, d], routing or None) -> (y <f>[B, L, d], MoEStats)."""

  def __call__(self, stack: str, index: int, ff_params: dict, x: jax.Array,
               routing: routing_lib.Routing | None) -> tuple[jax.Array, moe_layer.MoEStats]:
    ...


@dataclasses.dataclass(frozen=True)
class DefaultMoE:
  """The hook without replication: `moe_apply` over home slots, on `mesh` (None: 1 device).

  Frozen and hashable, so it can be a static argument of `jax.jit`.
  """

  moe_config: MoEConfig
  execution: ExecutionConfig = ExecutionConfig()
  mesh: Any = None

  def __call__(self, stack: str, index: int, ff_params: dict, x: jax.Array,
               routing: routing_lib.Routing | None = None):
    del stack, index
    return moe_layer.moe_apply(ff_params, x, self.moe_config, execution=self.execution,
                               mesh=self.mesh, routing=routing)
