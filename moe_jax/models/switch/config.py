"""Switch Transformer configuration, read from / written to Hugging Face's `config.json` fields.

Parameter tree of a Switch model (all arrays; Dense kernels are [in, out], the transpose of HF's
`nn.Linear.weight`; experts stacked on a leading E axis):

  {
    "shared": <f>[V, d],                          # token embedding (tied models: also the head)
    # untied models only (tie_word_embeddings=False):
    "encoder_embed": <f>[V, d], "decoder_embed": <f>[V, d], "lm_head": <f>[d, V],
    "encoder": {
      "relative_attention_bias": <f>[num_buckets, H],
      "final_norm": <f>[d],
      "blocks": [                                 # one dict per block, in order
        {"attn_norm": [d], "attn": {"q": [d, H*dkv], "k": ..., "v": ..., "o": [H*dkv, d]},
         "ff_norm": [d],
         "ff": {"wi": [d, f], "wo": [f, d]}                       # dense block
            or {"router": [d, E], "wi": [E, d, f], "wo": [E, f, d]}},  # sparse block
        ...
      ],
    },
    "decoder": {... as encoder, and every block also has
                "cross_norm": [d], "cross": {"q", "k", "v", "o"}},
  }
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from moe_jax.checkpoints.safetensors_io import read_json

MODEL_TYPE = "switch_transformers"   # config.json's model_type
_HF_FIELDS = {
    # our name: (HF config.json name, default when absent)
    "vocab_size": ("vocab_size", 32128),
    "d_model": ("d_model", 768),
    "d_kv": ("d_kv", 64),
    "d_ff": ("d_ff", 2048),
    "num_heads": ("num_heads", 12),
    "num_layers": ("num_layers", 12),
    "num_decoder_layers": ("num_decoder_layers", 12),
    "num_sparse_encoder_layers": ("num_sparse_encoder_layers", 3),
    "num_sparse_decoder_layers": ("num_sparse_decoder_layers", 3),
    "num_experts": ("num_experts", 8),
    "expert_capacity": ("expert_capacity", 64),
    "relative_attention_num_buckets": ("relative_attention_num_buckets", 32),
    "relative_attention_max_distance": ("relative_attention_max_distance", 128),
    "layer_norm_epsilon": ("layer_norm_epsilon", 1e-6),
    "router_z_loss_coef": ("router_z_loss_coef", 0.001),
    "router_aux_loss_coef": ("router_aux_loss_coef", 0.001),
    "tie_word_embeddings": ("tie_word_embeddings", True),
    "pad_token_id": ("pad_token_id", 0),
    "eos_token_id": ("eos_token_id", 1),
    "decoder_start_token_id": ("decoder_start_token_id", 0),
    "dense_act_fn": ("dense_act_fn", "relu"),
}

# config.json fields the parameter shapes depend on.
_SHAPE_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                 "num_decoder_layers", "num_sparse_encoder_layers", "num_sparse_decoder_layers",
                 "num_experts", "relative_attention_num_buckets", "tie_word_embeddings")


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
  """Shapes and semantics of a Switch Transformer (field names follow HF's config.json)."""

  vocab_size: int = 32128
  d_model: int = 768
  d_kv: int = 64
  d_ff: int = 2048
  num_heads: int = 12
  num_layers: int = 12
  num_decoder_layers: int = 12
  num_sparse_encoder_layers: int = 3
  num_sparse_decoder_layers: int = 3
  encoder_sparse_step: int | None = None   # explicit value in config.json wins
  decoder_sparse_step: int | None = None
  num_experts: int = 8
  expert_capacity: int | None = 64         # None: dropless (no router-stage capacity)
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  router_z_loss_coef: float = 0.001
  router_aux_loss_coef: float = 0.001
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dense_act_fn: str = "relu"
  # (key, value) of each shape-defining key config.json lacked and HF's default used instead
  # (`from_hf_dict`); named in the error when the weights do not match. Not part of equality.
  assumed_defaults: tuple = dataclasses.field(default=(), compare=False, repr=False)

  def __post_init__(self):
    if self.dense_act_fn != "relu":
      raise ValueError(f"dense_act_fn={self.dense_act_fn!r}: only Switch's 'relu' is supported.")
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_experts"):
      if getattr(self, name) < 1:
        raise ValueError(f"SwitchConfig.{name} must be >= 1, got {getattr(self, name)}.")

  # --- sparse-block positions (HF semantics) ---

  @property
  def encoder_step(self) -> int:
    return _sparse_step(self.encoder_sparse_step, self.num_layers, self.num_sparse_encoder_layers)

  @property
  def decoder_step(self) -> int:
    return _sparse_step(self.decoder_sparse_step, self.num_decoder_layers,
                        self.num_sparse_decoder_layers)

  def sparse_blocks(self, stack: str) -> tuple[int, ...]:
    """Indices of the sparse (MoE) blocks of "encoder" or "decoder"."""
    if stack == "encoder":
      return sparse_block_indices(self.num_layers, self.encoder_step)
    if stack == "decoder":
      return sparse_block_indices(self.num_decoder_layers, self.decoder_step)
    raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")

  def num_blocks(self, stack: str) -> int:
    return self.num_layers if stack == "encoder" else self.num_decoder_layers

  # --- HF config.json ---

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "SwitchConfig":
    """From config.json's fields; a missing field takes HF's default, as transformers does (the
    shape-defining ones are recorded in `assumed_defaults`)."""
    kwargs = {ours: d.get(theirs, default) for ours, (theirs, default) in _HF_FIELDS.items()}
    kwargs["assumed_defaults"] = tuple((theirs, default) for theirs, default in
                                       (_HF_FIELDS[k] for k in _SHAPE_FIELDS) if theirs not in d)
    kwargs["encoder_sparse_step"] = d.get("encoder_sparse_step")
    kwargs["decoder_sparse_step"] = d.get("decoder_sparse_step")
    if kwargs["decoder_start_token_id"] is None:
      kwargs["decoder_start_token_id"] = 0
    if isinstance(kwargs["eos_token_id"], list):
      kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    return cls(**kwargs)

  @classmethod
  def from_hf_dir(cls, path: str) -> "SwitchConfig":
    """Reads `config.json`, then `generation_config.json` (its decoder start / eos win)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
      raise FileNotFoundError(f"no config.json in {path!r}: point at a Hugging Face Switch "
                              "checkpoint directory (config.json + model.safetensors).")
    d = read_json(cfg_path)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
      gen = read_json(gen_path)
      for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is not None:
          d[key] = gen[key]
    return cls.from_hf_dict(d)

  def to_hf_dict(self) -> dict[str, Any]:
    d = {theirs: getattr(self, ours) for ours, (theirs, _) in _HF_FIELDS.items()}
    for key in ("encoder_sparse_step", "decoder_sparse_step"):
      if getattr(self, key) is not None:
        d[key] = getattr(self, key)
    d["model_type"] = MODEL_TYPE
    d["architectures"] = ["SwitchTransformersForConditionalGeneration"]
    return d

  def replace(self, **changes) -> "SwitchConfig":
    return dataclasses.replace(self, **changes)


def _sparse_step(explicit: int | None, num_layers: int, num_sparse: int) -> int:
  if explicit is not None:
    return explicit
  if num_sparse > 0:
    return num_layers // num_sparse
  return num_layers


def sparse_block_indices(num_blocks: int, step: int) -> tuple[int, ...]:
  """HF rule: block i is sparse iff step > 0 and (i % step == 1 or step == 1)."""
  if step <= 0:
    return ()
  return tuple(i for i in range(num_blocks) if step == 1 or i % step == 1)
