"""DeepSeek-V3 configuration (Hugging Face `deepseek_v3`), read from config.json.

Defaults are transformers' `DeepseekV3Config`. What differs from the other decoder families:
  * multi-head latent attention (`ATTENTION = "mla"`): q LoRA rank `q_lora_rank` (None: a plain
    q projection), KV latent rank `kv_lora_rank`, per-head dims `qk_nope_head_dim` (no rope),
    `qk_rope_head_dim` (rotated; one rotated key shared by all heads) and `v_head_dim`; rotary
    pairs are interleaved (2i, 2i+1) when `rope_interleave` (HF's default). config.json writes
    `head_dim` = qk_rope_head_dim (it is the rope width, not the q/k head width), so it is
    read and checked, not used as a head width; `num_key_value_heads` is unused by MLA;
  * the sigmoid router: selection by sigmoid(logits) + `e_score_correction_bias` within the
    `topk_group` best of `n_group` expert groups, weights from the unbiased scores, renormalised
    iff `norm_topk_prob`, times `routed_scaling_factor`;
  * `n_shared_experts` shared experts, one SwiGLU of width moe_intermediate_size *
    n_shared_experts, added ungated;
  * the first `first_k_dense_replace` layers are dense (`intermediate_size`), the rest MoE;
  * `n_routed_experts` is the expert count; the multi-token-prediction layer
    (`num_nextn_predict_layers`) is neither built nor saved by HF, and is ignored here too.
"""

from __future__ import annotations

import dataclasses

from moe_jax.models.decoder.sigmoid_moe import SigmoidMoEConfig

MODEL_TYPE = "deepseek_v3"


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config(SigmoidMoEConfig):
  """A DeepSeek-V3 model (fields: see `DecoderConfig`, plus MLA, the router and the dense
  prefix)."""

  MODEL_TYPE = MODEL_TYPE
  ARCHITECTURE = "DeepseekV3ForCausalLM"
  ATTENTION = "mla"

  vocab_size: int = 129280
  hidden_size: int = 7168
  intermediate_size: int = 18432
  moe_intermediate_size: int | None = 2048
  num_hidden_layers: int = 61
  num_attention_heads: int = 128
  num_key_value_heads: int = 128
  num_experts: int = 256
  num_experts_per_tok: int = 8
  norm_topk_prob: bool = True
  rms_norm_eps: float = 1e-6
  bos_token_id: int | None = 0
  eos_token_id: tuple[int, ...] = (1,)
  max_position_embeddings: int = 4096
  n_shared_experts: int = 1
  first_k_dense_replace: int = 3
  n_group: int = 8
  topk_group: int = 4
  routed_scaling_factor: float = 2.5
  q_lora_rank: int | None = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  rope_interleave: bool = True

  def __post_init__(self):
    if self.head_dim not in (None, self.qk_rope_head_dim):
      raise ValueError(f"DeepseekV3Config.head_dim={self.head_dim}: DeepSeek's head_dim is the "
                       f"rope width qk_rope_head_dim={self.qk_rope_head_dim} (HF writes it so).")
    object.__setattr__(self, "head_dim", self.qk_rope_head_dim)
    super().__post_init__()

  @property
  def rotary_width(self) -> int:
    return self.qk_rope_head_dim

  @property
  def rope_interleaved(self) -> bool:
    return self.rope_interleave

  @property
  def cache_widths(self):
    return ((1, self.kv_lora_rank), (1, self.qk_rope_head_dim))
