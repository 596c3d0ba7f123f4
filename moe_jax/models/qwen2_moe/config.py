"""Qwen2-MoE configuration (Hugging Face `qwen2_moe`), read from config.json.

Defaults are transformers' `Qwen2MoeConfig`. What differs from the other decoder families:
  * a shared expert (SwiGLU of `shared_expert_intermediate_size`) every token goes through, scaled
    by sigmoid(x @ shared_expert_gate) (a [hidden, 1] gate without bias), added to the routed sum;
  * q/k/v projections carry biases (`qkv_bias`, true in released checkpoints), o_proj does not;
  * dense layers as Qwen3 (`mlp_only_layers`, `decoder_sparse_step`); no q/k norm;
  * released checkpoints use `norm_topk_prob=false` (raw top-k softmax weights);
  * sliding-window attention (`use_sliding_window=true`) is refused: full causal attention only.
"""

from __future__ import annotations

import dataclasses

from moe_jax.models.decoder.config import DecoderConfig

MODEL_TYPE = "qwen2_moe"


@dataclasses.dataclass(frozen=True)
class Qwen2MoeConfig(DecoderConfig):
  """A Qwen2-MoE model (fields: see `DecoderConfig`, plus the shared expert and qkv_bias)."""

  MODEL_TYPE = MODEL_TYPE
  ARCHITECTURE = "Qwen2MoeForCausalLM"
  SHARED_GATE = True
  PINNED = {"clip_qkv": None}

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 5632
  moe_intermediate_size: int | None = 1408
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_key_value_heads: int = 16
  num_experts: int = 60
  num_experts_per_tok: int = 4
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32768
  shared_expert_intermediate_size: int = 5632
  qkv_bias: bool = True                      # (overrides DecoderConfig's qkv_bias property)

  def __post_init__(self):
    super().__post_init__()
    if self.shared_expert_intermediate_size < 1:
      raise ValueError(f"Qwen2MoeConfig.shared_expert_intermediate_size="
                       f"{self.shared_expert_intermediate_size}: Qwen2-MoE always has a shared "
                       "expert (a positive width).")

  @property
  def shared_width(self) -> int:
    return self.shared_expert_intermediate_size

  @classmethod
  def from_hf_dict(cls, d):
    if d.get("num_key_value_heads") is None:      # HF: one kv head per query head
      d = {**d, "num_key_value_heads": d.get("num_attention_heads", cls.num_attention_heads)}
    return super().from_hf_dict(d)
