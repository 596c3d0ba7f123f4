"""The shared configuration of decoder-only MoE language models, read from HF's config.json.

A family subclasses `DecoderConfig`: its class variables say what is fixed for the family (the
config.json `model_type`, the q/k norm, how its checkpoint spells the MoE keys, field names and
values it pins) and its field defaults are transformers' for that family. Everything else (the
layers, the key map, generation) reads only the fields below, so a family is a few lines.

Parameter tree of a decoder model (Dense kernels are [in, out], the transpose of HF's
`nn.Linear.weight`; expert stacks have a leading E axis):

  {
    "embed": <f>[V, d],                              # token embedding (tied models: also the head)
    "lm_head": <f>[d, V],                            # untied models only
    "final_norm": <f>[d],
    "layers": [                                      # one dict per decoder layer, in order
      {"attn_norm": [d],
       "attn": {"q": [d, H*hd], "k": [d, Hkv*hd], "v": [d, Hkv*hd], "o": [H*hd, d],
                "q_bias": [H*hd], "k_bias": [Hkv*hd], "v_bias": [Hkv*hd],  # qkv_bias families
                "q_norm": [hd] or [H*hd], "k_norm": [hd] or [Hkv*hd]},   # families with q/k norm
            or (MLA) {"q": [d, H*(n+r)] or "q_a": [d, Rq], "q_a_norm": [Rq], "q_b": [Rq, H*(n+r)],
                      "kv_a": [d, Rkv + r], "kv_a_norm": [Rkv], "kv_b": [Rkv, H*(n+v)],
                      "o": [H*v, d]},                # n/r: nope/rope head dims, v: value dim
       "mlp_norm": [d],
       "mlp": {"wi_gate": [d, I], "wi": [d, I], "wo": [I, d]}                 # dense layer
           or {"router": [d, E], "wi_gate": [E, d, f], "wi": [E, d, f], "wo": [E, f, d],  # MoE
               "router_bias": [E]},                  # sigmoid routers (selection-only bias)
       "shared_mlp": {"wi_gate": [d, S], "wi": [d, S], "wo": [S, d]},   # MoE layers of families
       "shared_gate": [d, 1]},                       # with a shared expert; Qwen2-MoE's gate
      ...
    ],
  }

(`wi_gate` = HF's gate_proj / Mixtral's w1, `wi` = up_proj / w3, `wo` = down_proj / w2.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

QK_NORMS = ("none", "per_head", "full")
_LAYER_TYPES_OK = ("full_attention",)


@dataclasses.dataclass(frozen=True)
class ExpertKeys:
  """How a family's per-expert checkpoint spells its MoE block under `model.layers.{i}.`.

  Attributes:
    block: the MoE block's module ("mlp"; Mixtral: "block_sparse_moe").
    gate, up, down: the expert projections' names (Mixtral: "w1", "w3", "w2").
    shared: the shared expert's module in the block ("shared_expert"; DeepSeek and GLM:
      "shared_experts"), for families with one.
  The router is `{block}.gate.weight`. The fused layout transformers 5 can write is the same for
  every family: `mlp.gate.weight`, `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`.
  """

  block: str = "mlp"
  gate: str = "gate_proj"
  up: str = "up_proj"
  down: str = "down_proj"
  shared: str = "shared_expert"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shapes and semantics of a decoder-only MoE model (field names follow HF's config.json).

  Layer i is MoE iff i not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0 (HF's
  Qwen rule; every layer for families that pin step 1 and no MLP-only layers); the others are
  dense SwiGLU MLPs of `intermediate_size`. Experts are `moe_intermediate_size` wide (None: the
  family's experts use `intermediate_size`, as Mixtral and OLMoE do).
  """

  MODEL_TYPE: ClassVar[str] = ""
  ARCHITECTURE: ClassVar[str] = ""
  QK_NORM: ClassVar[str] = "none"            # "per_head" (Qwen3), "full" (OLMoE)
  ATTENTION: ClassVar[str] = "gqa"           # "mla": DeepSeek's multi-head latent attention
  SHARED_GATE: ClassVar[bool] = False        # shared expert scaled by sigmoid(x @ shared_gate)
  EXPERT_KEYS: ClassVar[ExpertKeys] = ExpertKeys()
  PINNED: ClassVar[dict] = {}                # field -> the only value the family allows
  HF_NAMES: ClassVar[dict] = {}              # our field -> config.json names (first found wins)

  vocab_size: int = 64
  hidden_size: int = 32
  intermediate_size: int = 64
  moe_intermediate_size: int | None = None
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  head_dim: int | None = None                # None: hidden_size // num_attention_heads
  num_experts: int = 8
  num_experts_per_tok: int = 2
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  clip_qkv: float | None = None
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()         # generation stops at any of them
  pad_token_id: int | None = None
  router_aux_loss_coef: float = 0.001
  max_position_embeddings: int = 4096

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
    set_("eos_token_id", _id_tuple(self.eos_token_id))
    name = type(self).__name__
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "num_experts",
                  "num_experts_per_tok", "decoder_sparse_step"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}.{field} must be a positive int, got {value!r}.")
    for field, allowed in self.PINNED.items():
      if getattr(self, field) != allowed:
        raise ValueError(f"{name}.{field}={getattr(self, field)!r} is not supported by the "
                         f"{self.MODEL_TYPE} family (it is always {allowed!r}).")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"{name}: num_attention_heads={self.num_attention_heads} is not a multiple "
                       f"of num_key_value_heads={self.num_key_value_heads}.")
    if self.head_width % 2:
      raise ValueError(f"{name}: head_dim={self.head_width} must be even for rotary embeddings.")
    if self.num_experts_per_tok > self.num_experts:
      raise ValueError(f"{name}: num_experts_per_tok={self.num_experts_per_tok} exceeds "
                       f"num_experts={self.num_experts}.")
    if not self.sparse_layers:
      raise ValueError(f"{name}: no layer is MoE (mlp_only_layers={list(self.mlp_only_layers)}, "
                       f"decoder_sparse_step={self.decoder_sparse_step}); moe_jax serves MoE "
                       "models only.")

  # --- derived shapes ---

  @property
  def head_width(self) -> int:
    """hd: `head_dim`, or hidden_size // num_attention_heads when unset."""
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def expert_width(self) -> int:
    """f: the experts' hidden width."""
    return self.moe_intermediate_size or self.intermediate_size

  # --- what a family may override (defaults: a plain Llama-style MoE decoder) ---

  @property
  def qk_norm(self) -> str:
    """"none", "per_head" (RMSNorm over hd per head) or "full" (over the whole projection)."""
    return self.QK_NORM

  @property
  def qkv_bias(self) -> bool:
    """The q/k/v projections have biases (Qwen2-MoE's qkv_bias, GLM's attention_bias)."""
    return False

  @property
  def rotary_width(self) -> int:
    """Leading head dims rotary embeddings rotate (the rest pass through)."""
    return self.head_width

  @property
  def rope_interleaved(self) -> bool:
    """Rotary pairs are (2i, 2i+1) (DeepSeek) rather than (i, i + width/2)."""
    return False

  @property
  def shared_width(self) -> int | None:
    """Width of the shared expert every token also goes through, or None (no shared expert)."""
    return None

  @property
  def router_options(self) -> dict:
    """The MoE layers' routing rule, as `moe_jax.MoEConfig` fields."""
    return {"router": "softmax"}

  @property
  def cache_widths(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, width) of the two per-layer KV-cache arrays (keys and values for GQA)."""
    return ((self.num_key_value_heads, self.head_width),) * 2

  @property
  def sparse_layers(self) -> tuple[int, ...]:
    """Indices of the MoE layers (HF's rule, see the class docstring)."""
    return tuple(i for i in range(self.num_hidden_layers)
                 if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0)

  @property
  def generation_pad_id(self) -> int:
    """What fills finished rows in `generate`: pad_token_id, else the first eos (as HF), else 0."""
    if self.pad_token_id is not None:
      return self.pad_token_id
    return self.eos_token_id[0] if self.eos_token_id else 0

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  # --- HF config.json ---

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
    """The config of a config.json dict (ValueError naming any field value it cannot honour)."""
    model_type = d.get("model_type", cls.MODEL_TYPE)
    if model_type != cls.MODEL_TYPE:
      raise ValueError(f"config.json has model_type={model_type!r}, not {cls.MODEL_TYPE!r}; load "
                       "it with moe_jax.models.from_pretrained, which picks the family.")
    fields = {f.name for f in dataclasses.fields(cls)}
    check_hf_common(d, fields)
    kwargs = {}
    for ours, names in {**{f.name: (f.name,) for f in dataclasses.fields(cls)},
                        **cls.HF_NAMES}.items():
      present = [n for n in names if n in d]
      if present:          # the first non-null spelling; an explicit null stays None (bos...)
        kwargs[ours] = next((d[n] for n in present if d[n] is not None), None)
    kwargs["rope_theta"] = rope_theta(d, cls.rope_theta)
    partial = partial_rotary_factor(d)
    if "partial_rotary_factor" in fields:
      kwargs["partial_rotary_factor"] = partial
    elif partial != 1.0:
      raise ValueError(f"config.json has partial_rotary_factor={partial}; the {cls.MODEL_TYPE} "
                       "family rotates whole heads (only 1.0 is supported).")
    return cls(**kwargs)

  @classmethod
  def from_hf_dir(cls, path: str) -> "DecoderConfig":
    """Reads `config.json`, then `generation_config.json` (its bos / eos / pad ids win)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
      raise FileNotFoundError(f"no config.json in {path!r}: point at a Hugging Face checkpoint "
                              "directory (config.json + model.safetensors).")
    with open(cfg_path) as f:
      d = json.load(f)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
      with open(gen_path) as f:
        gen = json.load(f)
      d.update({k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if gen.get(k) is not None})
    return cls.from_hf_dict(d)

  def to_hf_dict(self) -> dict[str, Any]:
    """config.json fields transformers reads for this family."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for ours, names in self.HF_NAMES.items():
      d[names[0]] = d.pop(ours)
    for field in self.PINNED:
      d.pop(field, None)
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if "partial_rotary_factor" in d:
      d["rope_parameters"]["partial_rotary_factor"] = d.pop("partial_rotary_factor")
    if "mlp_only_layers" in d:
      d["mlp_only_layers"] = list(self.mlp_only_layers)
    eos = list(self.eos_token_id)
    d["eos_token_id"] = None if not eos else eos[0] if len(eos) == 1 else eos
    d.update(model_type=self.MODEL_TYPE, architectures=[self.ARCHITECTURE], hidden_act="silu")
    return d


def _id_tuple(ids) -> tuple[int, ...]:
  if ids is None:
    return ()
  if isinstance(ids, int):
    return (ids,)
  return tuple(int(i) for i in ids)


def rope_theta(d: dict[str, Any], default: float) -> float:
  """θ of config.json: `rope_parameters.rope_theta` (transformers 5), else top-level `rope_theta`.

  Only plain RoPE is supported: any other rope type or scaling is a ValueError naming it.
  """
  params = d.get("rope_parameters") or {}
  scaling = d.get("rope_scaling") or {}
  for where, table in (("rope_parameters", params), ("rope_scaling", scaling)):
    kind = table.get("rope_type", table.get("type", "default"))
    if kind != "default":
      raise ValueError(f"config.json {where} has rope_type={kind!r}; only the default rotary "
                       "embedding is supported.")
  return float(params.get("rope_theta", d.get("rope_theta", default)))


def partial_rotary_factor(d: dict[str, Any]) -> float:
  """The rotated fraction of each head: `rope_parameters.partial_rotary_factor` (or top level)."""
  params = d.get("rope_parameters") or {}
  return float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))


def check_hf_common(d: dict[str, Any], fields=()) -> None:
  """ValueError for config.json values no decoder family here supports (`fields`: the family's
  config fields; a field the family reads is not refused here)."""
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json has hidden_act={act!r}; only 'silu' (SwiGLU) is supported.")
  if d.get("attention_bias") and "attention_bias" not in fields:
    raise ValueError("config.json has attention_bias=true; attention projections with biases "
                     "are not supported.")
  if d.get("quantization_config") is not None:
    raise ValueError("config.json has a quantization_config; load unquantized weights.")
  if d.get("use_sliding_window") or ("use_sliding_window" not in d
                                     and d.get("sliding_window") is not None):
    raise ValueError(f"config.json enables sliding-window attention (sliding_window="
                     f"{d.get('sliding_window')}); only full causal attention is supported.")
  bad = sorted(set(d.get("layer_types") or ()) - set(_LAYER_TYPES_OK))
  if bad:
    raise ValueError(f"config.json has layer_types {bad}; only 'full_attention' is supported.")


def config_from_dict(cls, model_dict: Any) -> DecoderConfig:
  """A `cls` config from a dict / `ml_collections.ConfigDict` of its fields (configs/*.py)."""
  if hasattr(model_dict, "to_dict"):
    model_dict = model_dict.to_dict()
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(model_dict) - known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(known)}.")
  return cls(**model_dict)
