"""Mixtral configuration (Hugging Face `mixtral`), read from config.json.

Defaults are transformers' `MixtralConfig`. What differs from the other decoder families:
  * every layer is MoE, experts are `intermediate_size` wide, the router always renormalises the
    top-k weights (there is no `norm_topk_prob` field);
  * per-expert checkpoints spell the block `block_sparse_moe` and the experts `w1` (gate), `w3`
    (up), `w2` (down); the fused layout transformers 5 writes uses `mlp.` like the others;
  * no q/k norm; `sliding_window` must be null (full causal attention);
  * `router_jitter_noise` multiplies router inputs by noise in training only: inference (HF's
    and this one) never applies it, so it is accepted and not used.
"""

from __future__ import annotations

import dataclasses

from moe_jax.models.decoder.config import DecoderConfig, ExpertKeys

MODEL_TYPE = "mixtral"


@dataclasses.dataclass(frozen=True)
class MixtralConfig(DecoderConfig):
  """A Mixtral model (fields: see `DecoderConfig`; the MoE rule and router are pinned)."""

  MODEL_TYPE = MODEL_TYPE
  ARCHITECTURE = "MixtralForCausalLM"
  EXPERT_KEYS = ExpertKeys(block="block_sparse_moe", gate="w1", up="w3", down="w2")
  PINNED = {"norm_topk_prob": True, "moe_intermediate_size": None, "decoder_sparse_step": 1,
            "mlp_only_layers": (), "clip_qkv": None}
  HF_NAMES = {"num_experts": ("num_local_experts",)}

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 14336
  moe_intermediate_size: int | None = None
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 8
  num_experts: int = 8
  num_experts_per_tok: int = 2
  norm_topk_prob: bool = True
  rms_norm_eps: float = 1e-5
  rope_theta: float = 1e6
  bos_token_id: int | None = 1
  eos_token_id: tuple[int, ...] = (2,)
  max_position_embeddings: int = 4096 * 32

  @classmethod
  def from_hf_dict(cls, d):
    if d.get("num_key_value_heads") is None:      # HF: one kv head per query head
      d = {**d, "num_key_value_heads": d.get("num_attention_heads", cls.num_attention_heads)}
    return super().from_hf_dict(d)
