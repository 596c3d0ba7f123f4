"""Qwen3-MoE configuration (Hugging Face `qwen3_moe`), read from config.json.

Defaults are transformers' `Qwen3MoeConfig`. What differs from the other decoder families:
  * q_norm / k_norm: RMSNorm over `head_dim`, per head, after the projection and before RoPE;
  * `head_dim` comes from config.json and may differ from hidden_size / num_attention_heads;
  * dense layers: `mlp_only_layers` and `decoder_sparse_step` (layer i is MoE iff i is not in
    mlp_only_layers and (i + 1) % decoder_sparse_step == 0); dense MLPs are `intermediate_size`
    wide, experts `moe_intermediate_size`;
  * the expert count is written `num_local_experts` by transformers 5.24 and `num_experts` in hub
    configs: both are read (`to_hf_dict` writes the former).
"""

from __future__ import annotations

import dataclasses

from moe_jax.models.decoder.config import DecoderConfig

MODEL_TYPE = "qwen3_moe"


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(DecoderConfig):
  """A Qwen3-MoE model (fields: see `DecoderConfig`; `clip_qkv` must stay None)."""

  MODEL_TYPE = MODEL_TYPE
  ARCHITECTURE = "Qwen3MoeForCausalLM"
  QK_NORM = "per_head"
  PINNED = {"clip_qkv": None}
  HF_NAMES = {"num_experts": ("num_local_experts", "num_experts")}

  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 6144
  moe_intermediate_size: int | None = 768
  num_hidden_layers: int = 24
  num_attention_heads: int = 32
  num_key_value_heads: int = 4
  num_experts: int = 128
  num_experts_per_tok: int = 8
  rms_norm_eps: float = 1e-6
  router_aux_loss_coef: float = 0.001
  max_position_embeddings: int = 32768
