"""OLMoE configuration (Hugging Face `olmoe`), read from config.json.

Defaults are transformers' `OlmoeConfig`. What differs from the other decoder families:
  * q_norm / k_norm: RMSNorm over the whole q projection (width hidden_size) and the whole k
    projection (hidden_size / heads * kv_heads), before the head split and RoPE; then, when
    `clip_qkv` is set, q, k and v are clamped to [-clip_qkv, clip_qkv];
  * every layer is MoE, experts are `intermediate_size` wide; released checkpoints use
    `norm_topk_prob=false` (raw top-k probabilities, summing to < 1);
  * head_dim is hidden_size / num_attention_heads (the q norm's width assumes it).
"""

from __future__ import annotations

import dataclasses

from moe_jax.models.decoder.config import DecoderConfig

MODEL_TYPE = "olmoe"


@dataclasses.dataclass(frozen=True)
class OlmoeConfig(DecoderConfig):
  """An OLMoE model (fields: see `DecoderConfig`; the MoE rule is pinned)."""

  MODEL_TYPE = MODEL_TYPE
  ARCHITECTURE = "OlmoeForCausalLM"
  QK_NORM = "full"
  PINNED = {"moe_intermediate_size": None, "decoder_sparse_step": 1, "mlp_only_layers": ()}

  vocab_size: int = 50304
  hidden_size: int = 2048
  intermediate_size: int = 2048
  moe_intermediate_size: int | None = None
  num_hidden_layers: int = 16
  num_attention_heads: int = 16
  num_key_value_heads: int = 16
  num_experts: int = 64
  num_experts_per_tok: int = 8
  rms_norm_eps: float = 1e-5
  eos_token_id: tuple[int, ...] = (50279,)
  pad_token_id: int | None = 1
  router_aux_loss_coef: float = 0.01

  def __post_init__(self):
    super().__post_init__()
    if self.head_dim not in (None, self.hidden_size // self.num_attention_heads):
      raise ValueError(f"OlmoeConfig.head_dim={self.head_dim}: OLMoE's q/k norms assume "
                       f"hidden_size / num_attention_heads = "
                       f"{self.hidden_size // self.num_attention_heads}.")

  @classmethod
  def from_hf_dict(cls, d):
    if d.get("num_key_value_heads") is None:      # HF: one kv head per query head
      d = {**d, "num_key_value_heads": d.get("num_attention_heads", cls.num_attention_heads)}
    return super().from_hf_dict(d)
