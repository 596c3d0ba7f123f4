"""GLM-4-MoE configuration (Hugging Face `glm4_moe`: GLM-4.5, GLM-4.5-Air), read from config.json.

Defaults are transformers' `Glm4MoeConfig`. What differs from the other decoder families:
  * DeepSeek-V3's sigmoid router and shared experts (see `moe_jax.models.deepseek_v3`), with
    `n_group = topk_group = 1` in released checkpoints, and the dense prefix
    `first_k_dense_replace`; `n_routed_experts` is the expert count;
  * GQA attention (no MLA) with q/k/v biases when `attention_bias` (true in GLM-4.5), per-head
    q/k RMSNorm when `use_qk_norm`, and partial rotary embeddings: only the first
    head_dim * `partial_rotary_factor` dims of a head rotate (rotate_half within them;
    transformers defaults the factor to 0.5 when config.json omits it);
  * the multi-token-prediction layer (`num_nextn_predict_layers`) is ignored, as HF ignores it.
"""

from __future__ import annotations

import dataclasses

from moe_jax.models.decoder.sigmoid_moe import SigmoidMoEConfig

MODEL_TYPE = "glm4_moe"


@dataclasses.dataclass(frozen=True)
class Glm4MoeConfig(SigmoidMoEConfig):
  """A GLM-4-MoE model (fields: see `DecoderConfig`, plus the router, shared experts, biases,
  q/k norm and partial rotary)."""

  MODEL_TYPE = MODEL_TYPE
  ARCHITECTURE = "Glm4MoeForCausalLM"

  vocab_size: int = 151552
  hidden_size: int = 4096
  intermediate_size: int = 10944
  moe_intermediate_size: int | None = 1408
  num_hidden_layers: int = 46
  num_attention_heads: int = 96
  num_key_value_heads: int = 8
  num_experts: int = 128
  num_experts_per_tok: int = 8
  norm_topk_prob: bool = True
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 131072
  n_shared_experts: int = 1
  first_k_dense_replace: int = 1
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  attention_bias: bool = False
  use_qk_norm: bool = False
  partial_rotary_factor: float = 0.5

  def __post_init__(self):
    super().__post_init__()
    width = self.head_width * self.partial_rotary_factor
    if not 0 < self.partial_rotary_factor <= 1 or width != int(width) or int(width) % 2:
      raise ValueError(f"Glm4MoeConfig.partial_rotary_factor={self.partial_rotary_factor}: "
                       f"head_dim={self.head_width} times it must be a positive even width.")

  @property
  def qk_norm(self) -> str:
    return "per_head" if self.use_qk_norm else "none"

  @property
  def qkv_bias(self) -> bool:
    return self.attention_bias

  @property
  def rotary_width(self) -> int:
    return int(self.head_width * self.partial_rotary_factor)
