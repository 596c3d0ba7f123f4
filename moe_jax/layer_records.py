"""What one MoE layer of one pass records under the stack runner: the full `LayerRecord`
(per-token predictions, the slot table, the layer's `MoEStats`) and its fixed-size
`LayerSummary` (per-expert and per-device counts and scalars), which a loop over passes (e.g.
generation's decode steps) can keep one of per pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import moe_layer


@struct.dataclass
class LayerRecord:
  """One MoE layer of one forward pass.

  Attributes:
    predicted_load: <f32>[E] the estimate its placement used (zeros when none).
    predicted_top1: <int32>[T] per-token predicted expert (-1 when the predictor has none).
    slot_table: <int32>[De, h + r] the table it ran with (home columns, then its replicas').
    fetched_bytes: <f32>[] expert-weight bytes moved into its replica slots (every filled slot;
      with resident replicas only the changed ones).
    stats: its `MoEStats` (true loads, per-device tokens, balancedness, non-finite tokens).
  """

  predicted_load: jax.Array
  predicted_top1: jax.Array
  slot_table: jax.Array
  fetched_bytes: jax.Array
  stats: moe_layer.MoEStats

  @property
  def non_finite_tokens(self) -> jax.Array:
    """<int32>[] tokens this layer routed nowhere because their input or logits were not finite."""
    return self.stats.non_finite_tokens

  def summary(self, home_slots: int) -> "LayerSummary":
    """Its `LayerSummary`; `home_slots` = h, the slots per device before the replica slots."""
    predicted = self.predicted_top1 >= 0
    true_top1 = self.stats.routing.expert_ids[:, 0]
    return LayerSummary(
        tokens_per_expert=self.stats.tokens_per_expert,
        tokens_per_device=self.stats.tokens_per_device,
        predicted_load=self.predicted_load.astype(jnp.float32),
        fetched_bytes=jnp.asarray(self.fetched_bytes, jnp.float32),
        replica_rows=jnp.sum(self.stats.tokens_per_slot[..., home_slots:]).astype(jnp.int32),
        top1_hits=jnp.sum(predicted & (self.predicted_top1 == true_top1)).astype(jnp.int32),
        top1_predicted=jnp.sum(predicted).astype(jnp.int32),
        dropped_choices=self.stats.dropped_choices)


@struct.dataclass
class LayerSummary:
  """The fixed-size part of a `LayerRecord`.

  Attributes:
    tokens_per_expert: <int32>[E] true loads (choices the router sent to each expert).
    tokens_per_device: <int32>[Dd, De] choices computed on each device (after replication).
    predicted_load: <f32>[E] the estimate the placement used.
    fetched_bytes: <f32>[] expert-weight bytes moved into replica slots.
    replica_rows: <int32>[] choices computed in replica slots.
    top1_hits: <int32>[] tokens whose predicted top-1 expert is their true top-1.
    top1_predicted: <int32>[] tokens with a per-token prediction (predicted top-1 >= 0).
    dropped_choices: <int32>[] choices lost to capacity (0 when dropless).
  """

  tokens_per_expert: jax.Array
  tokens_per_device: jax.Array
  predicted_load: jax.Array
  fetched_bytes: jax.Array
  replica_rows: jax.Array
  top1_hits: jax.Array
  top1_predicted: jax.Array
  dropped_choices: jax.Array

  @classmethod
  def zeros(cls, leading: tuple[int, ...], num_experts: int, devices: tuple[int, int]
            ) -> "LayerSummary":
    """A zero summary with leading axes `leading` (e.g. (passes, layers)); `devices` = (Dd, De)."""
    count = lambda *shape: jnp.zeros(leading + shape, jnp.int32)
    return cls(tokens_per_expert=count(num_experts), tokens_per_device=count(*devices),
               predicted_load=jnp.zeros(leading + (num_experts,), jnp.float32),
               fetched_bytes=jnp.zeros(leading, jnp.float32), replica_rows=count(),
               top1_hits=count(), top1_predicted=count(), dropped_choices=count())
