"""The DeepSeek-V3 MoE block's configuration, shared by DeepSeek-V3 and GLM-4-MoE.

Both families route with the sigmoid rule (`moe_jax.routing.sigmoid_rule`: selection by
sigmoid(logits) + `e_score_correction_bias` within the `topk_group` best of `n_group` contiguous
expert groups, weights from the unbiased scores, renormalised iff `norm_topk_prob`, times
`routed_scaling_factor`), add `n_shared_experts` ungated shared experts (one SwiGLU of width
moe_intermediate_size * n_shared_experts), keep the first `first_k_dense_replace` layers dense,
and write the expert count as `n_routed_experts`.
"""

from __future__ import annotations

import dataclasses

from moe_jax.models.decoder.config import DecoderConfig, ExpertKeys


@dataclasses.dataclass(frozen=True)
class SigmoidMoEConfig(DecoderConfig):
  """A decoder with DeepSeek-V3's MoE block (a family subclasses it and sets its defaults)."""

  EXPERT_KEYS = ExpertKeys(shared="shared_experts")
  PINNED = {"decoder_sparse_step": 1, "mlp_only_layers": (), "clip_qkv": None}
  HF_NAMES = {"num_experts": ("n_routed_experts", "num_local_experts")}

  n_shared_experts: int = 1
  first_k_dense_replace: int = 1
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0

  def __post_init__(self):
    name = type(self).__name__
    for field in ("n_group", "topk_group"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}.{field} must be a positive int, got {value!r}.")
    if self.num_experts % self.n_group or self.topk_group > self.n_group:
      raise ValueError(f"{name}: n_group={self.n_group} must divide n_routed_experts="
                       f"{self.num_experts} and be >= topk_group={self.topk_group}.")
    if self.n_group > 1 and self.num_experts // self.n_group < 2:
      raise ValueError(f"{name}: n_group={self.n_group} leaves groups of one expert; a group's "
                       "score is the sum of its two best experts.")
    eligible = self.topk_group * self.num_experts // self.n_group
    if self.num_experts_per_tok > eligible:
      raise ValueError(f"{name}: num_experts_per_tok={self.num_experts_per_tok} exceeds the "
                       f"{eligible} experts of topk_group={self.topk_group} groups.")
    if not 0 <= self.first_k_dense_replace < self.num_hidden_layers:
      raise ValueError(f"{name}.first_k_dense_replace={self.first_k_dense_replace} leaves no MoE "
                       f"layer among num_hidden_layers={self.num_hidden_layers}.")
    if not self.routed_scaling_factor > 0:
      raise ValueError(f"{name}.routed_scaling_factor must be > 0, got "
                       f"{self.routed_scaling_factor!r}.")
    super().__post_init__()

  @property
  def sparse_layers(self) -> tuple[int, ...]:
    """Layer i is MoE iff i >= first_k_dense_replace."""
    return tuple(range(self.first_k_dense_replace, self.num_hidden_layers))

  @property
  def shared_width(self) -> int | None:
    return self.expert_width * self.n_shared_experts or None

  @property
  def router_options(self) -> dict:
    return {"router": "sigmoid", "num_groups": self.n_group, "top_groups": self.topk_group,
            "routed_scaling": float(self.routed_scaling_factor)}
