"""Typed configuration of one MoE layer: what the layer *is*, and how one run *executes* it.

`MoEConfig` holds the layer's semantics (experts, widths, top-k, activation, dtype): two layers with
equal `MoEConfig`s and params compute the same function. `ExecutionConfig` holds how a run computes
it (dropless or capacity-limited, which collective and grouped-matmul backend, chunking): it may
change speed and, in capacity mode, which token-choices overflow, never the routing. How many
replica slots a layer has is neither: it is the column count of the `Replicas` a call receives
(see `moe_jax.replicas`), and replication's configuration chooses it.

Both are frozen dataclasses validated once, at construction, so bad values fail here with a message
that names the fix instead of failing later inside XLA with a shape error. Mesh-dependent checks
(experts divisible by the expert axis, batch divisible by the data axis) happen in `moe_apply`, the
first place the mesh is known.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

CAPACITY_MODES = ("dropless", "capacity")
ACTIVATIONS = ("relu", "silu")
ROUTERS = ("softmax", "sigmoid")       # the rules of `moe_jax.routing.ROUTERS`
GMM_BACKENDS = ("auto", "ragged_dot", "windowed", "dense")
ALL_TO_ALL_MODES = ("auto", "ragged", "padded", "emulated_ragged")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """What one MoE layer computes.

  Attributes:
    num_experts: E, the number of distinct experts.
    d_model: width of the token representation.
    d_ff: hidden width of each expert FFN.
    top_k: experts chosen per token (1 = Switch).
    activation: "relu" (Switch/T5: wo(relu(wi x))) or "silu" (gated: wo(silu(wi_gate x) * wi x)).
    renormalize: divide the chosen top-k weights by their sum (k >= 2 only matters).
    dtype: parameter and activation dtype of the experts; the router always computes in float32.
    router: the routing rule (`moe_jax.routing.ROUTERS`): "softmax" (softmax over all experts,
      top-k; Switch, Qwen, Mixtral, OLMoE) or "sigmoid" (sigmoid scores; selection by scores +
      the layer's optional "router_bias" [E] within the best groups; weights from the unbiased
      scores; DeepSeek-V3, GLM-4-MoE).
    num_groups: sigmoid router: experts form this many contiguous groups (HF's n_group).
    top_groups: sigmoid router: only the best `top_groups` groups are eligible (topk_group); a
      group's score is the sum of its two best biased scores.
    routed_scaling: the kept weights are multiplied by this (HF's routed_scaling_factor).
  """

  num_experts: int
  d_model: int
  d_ff: int
  top_k: int = 1
  activation: str = "relu"
  renormalize: bool = False
  dtype: str = "float32"
  router: str = "softmax"
  num_groups: int = 1
  top_groups: int = 1
  routed_scaling: float = 1.0

  def __post_init__(self):
    for name in ("num_experts", "d_model", "d_ff", "top_k", "num_groups", "top_groups"):
      _check_positive_int(type(self).__name__, name, getattr(self, name))
    if self.top_k > self.num_experts:
      raise ValueError(
          f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: "
          "choose top_k <= num_experts.")
    _check_choice("MoEConfig", "activation", self.activation, ACTIVATIONS)
    _check_choice("MoEConfig", "router", self.router, ROUTERS)
    self._check_groups()
    try:
      jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"MoEConfig.dtype={self.dtype!r} is not a dtype; use 'float32' or "
                       "'bfloat16'.") from e

  def _check_groups(self):
    if self.num_experts % self.num_groups:
      raise ValueError(f"MoEConfig.num_groups={self.num_groups} does not divide "
                       f"num_experts={self.num_experts}: groups are equal contiguous blocks.")
    if self.top_groups > self.num_groups:
      raise ValueError(f"MoEConfig.top_groups={self.top_groups} exceeds "
                       f"num_groups={self.num_groups}.")
    if self.num_groups > 1 and self.router != "sigmoid":
      raise ValueError(f"MoEConfig.num_groups={self.num_groups}: group-limited selection is a "
                       "rule of the 'sigmoid' router; set router='sigmoid' or num_groups=1.")
    eligible = self.top_groups * (self.num_experts // self.num_groups)
    if self.top_k > eligible:
      raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds the {eligible} experts of the "
                       f"top_groups={self.top_groups} eligible groups.")
    if self.num_groups > 1 and self.num_experts // self.num_groups < 2:
      raise ValueError("MoEConfig: a group's score is the sum of its two best experts, so "
                       "groups need >= 2 experts; lower num_groups.")
    if (isinstance(self.routed_scaling, bool)
        or not isinstance(self.routed_scaling, (int, float)) or self.routed_scaling <= 0):
      raise ValueError(f"MoEConfig.routed_scaling must be > 0, got {self.routed_scaling!r}.")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def gated(self) -> bool:
    return self.activation == "silu"

  def replace(self, **changes) -> "MoEConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """How one run executes a MoE layer.

  Attributes:
    capacity_mode: "dropless" (no token-choice is ever lost) or "capacity" (fixed per-slot
      buffers; the overflow is dropped, contributes 0, and is counted in the stats).
    capacity_factor: in capacity mode, C = ceil(capacity_factor * T_group * top_k / E), where
      T_group is the number of tokens on one device (the routing group, as in GShard).
    capacity: an explicit per-slot, per-group capacity; overrides `capacity_factor` when set.
    gmm_backend: grouped-matmul implementation: "auto" (ragged_dot on GPU/TPU, windowed on CPU),
      "ragged_dot", "windowed" (CPU-efficient), or "dense" (per-row weights; a slow reference).
    all_to_all: dropless exchange collective: "auto" (ragged on GPU/TPU, padded on CPU), "ragged"
      (`lax.ragged_all_to_all`), "padded" (fixed worst-case buffers + `lax.all_to_all`), or
      "emulated_ragged" (the ragged algorithm with the collective emulated by all_gather: lets CPU
      tests check the ragged offset arithmetic numerically).
    num_chunks: split each device's tokens into this many chunks, each dispatched, computed and
      combined on its own, so the all-to-all of one chunk can overlap the matmuls of another.
  """

  capacity_mode: str = "dropless"
  capacity_factor: float = 1.25
  capacity: int | None = None
  gmm_backend: str = "auto"
  all_to_all: str = "auto"
  num_chunks: int = 1

  def __post_init__(self):
    _check_choice("ExecutionConfig", "capacity_mode", self.capacity_mode, CAPACITY_MODES)
    _check_choice("ExecutionConfig", "gmm_backend", self.gmm_backend, GMM_BACKENDS)
    _check_choice("ExecutionConfig", "all_to_all", self.all_to_all, ALL_TO_ALL_MODES)
    _check_positive_int("ExecutionConfig", "num_chunks", self.num_chunks)
    if (isinstance(self.capacity_factor, bool)
        or not (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0)):
      raise ValueError(
          f"ExecutionConfig.capacity_factor must be > 0, got {self.capacity_factor!r}; "
          "use e.g. 1.25, or capacity_mode='dropless' for no capacity limit.")
    if self.capacity is not None:
      _check_positive_int("ExecutionConfig", "capacity", self.capacity, "None or ")

  @property
  def dropless(self) -> bool:
    return self.capacity_mode == "dropless"

  def group_capacity(self, cfg: MoEConfig, tokens_per_group: int) -> int:
    """Per-slot buffer rows for one routing group of `tokens_per_group` tokens (capacity mode)."""
    if self.capacity is not None:
      return self.capacity
    return max(1, math.ceil(self.capacity_factor * tokens_per_group * cfg.top_k
                            / cfg.num_experts))

  def replace(self, **changes) -> "ExecutionConfig":
    return dataclasses.replace(self, **changes)


def _check_positive_int(owner, name, value, alternatives=""):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{owner}.{name} must be {alternatives}a positive int, got {value!r}.")


def _check_choice(owner, name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{owner}.{name}={value!r} is not one of {allowed}.")
