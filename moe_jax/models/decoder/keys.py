"""Where every decoder parameter lives: Hugging Face state-dict keys -> leaves of the tree.

One table per checkpoint layout, both built from the config (the tree is documented in
`config.py`):

  * per-expert (what transformers' `save_pretrained` writes by default, and what the hub holds):
    `model.layers.{i}.{block}.experts.{e}.{gate,up,down}` (Mixtral: `block_sparse_moe` and
    `w1`/`w3`/`w2`), each expert filling one slice of an expert stack;
  * fused (`save_pretrained(..., save_original_format=False)` in transformers 5):
    `model.layers.{i}.mlp.experts.gate_up_proj [E, 2f, d]` (gate rows first, then up) and
    `mlp.experts.down_proj [E, d, f]`, each filling whole expert stacks.

`hf_key_map(config)` returns the per-expert table with the fused one as its "fused" variant; the
importer picks whichever the checkpoint's keys belong to (`KeyMap.matching`) and refuses a mix.

  spec = hf_key_map(cfg).specs["model.layers.1.mlp.experts.3.up_proj.weight"]
  spec.path == ("layers", 1, "mlp", "wi"); spec.expert == 3; spec.transpose == True
"""

from __future__ import annotations

from moe_jax.checkpoints.layout import KeyMap, TensorSpec
from moe_jax.models.decoder.config import DecoderConfig

PER_EXPERT = "per-expert"
FUSED = "fused"


def _linear(path, out_dim, in_dim, **kwargs) -> TensorSpec:
  return TensorSpec(path, (out_dim, in_dim), transpose=True, **kwargs)


def _attention_specs(specs: dict, cfg: DecoderConfig, i: int) -> None:
  if cfg.ATTENTION == "mla":
    _mla_specs(specs, cfg, i)
    return
  d, hd = cfg.hidden_size, cfg.head_width
  q_width, kv_width = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  root, attn = f"model.layers.{i}.self_attn", ("layers", i, "attn")
  for name, width in (("q", q_width), ("k", kv_width), ("v", kv_width)):
    specs[f"{root}.{name}_proj.weight"] = _linear(attn + (name,), width, d)
    if cfg.qkv_bias:
      specs[f"{root}.{name}_proj.bias"] = TensorSpec(attn + (f"{name}_bias",), (width,))
  specs[f"{root}.o_proj.weight"] = _linear(attn + ("o",), d, q_width)
  if cfg.qk_norm != "none":
    full = cfg.qk_norm == "full"
    specs[f"{root}.q_norm.weight"] = TensorSpec(attn + ("q_norm",), (q_width if full else hd,))
    specs[f"{root}.k_norm.weight"] = TensorSpec(attn + ("k_norm",), (kv_width if full else hd,))


def _mla_specs(specs: dict, cfg: DecoderConfig, i: int) -> None:
  """DeepSeek's multi-head latent attention (tree: see `config.py`)."""
  d, heads = cfg.hidden_size, cfg.num_attention_heads
  qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
  root, attn = f"model.layers.{i}.self_attn", ("layers", i, "attn")
  if cfg.q_lora_rank:
    specs[f"{root}.q_a_proj.weight"] = _linear(attn + ("q_a",), cfg.q_lora_rank, d)
    specs[f"{root}.q_a_layernorm.weight"] = TensorSpec(attn + ("q_a_norm",), (cfg.q_lora_rank,))
    specs[f"{root}.q_b_proj.weight"] = _linear(attn + ("q_b",), heads * qk, cfg.q_lora_rank)
  else:
    specs[f"{root}.q_proj.weight"] = _linear(attn + ("q",), heads * qk, d)
  specs[f"{root}.kv_a_proj_with_mqa.weight"] = _linear(
      attn + ("kv_a",), cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
  specs[f"{root}.kv_a_layernorm.weight"] = TensorSpec(attn + ("kv_a_norm",), (cfg.kv_lora_rank,))
  specs[f"{root}.kv_b_proj.weight"] = _linear(
      attn + ("kv_b",), heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
  specs[f"{root}.o_proj.weight"] = _linear(attn + ("o",), d, heads * cfg.v_head_dim)


def _swiglu_specs(specs: dict, root: str, path: tuple, width: int, d: int) -> None:
  """A dense SwiGLU MLP `{root}.{gate,up,down}_proj.weight` -> `path + (wi_gate, wi, wo)`."""
  specs[f"{root}.gate_proj.weight"] = _linear(path + ("wi_gate",), width, d)
  specs[f"{root}.up_proj.weight"] = _linear(path + ("wi",), width, d)
  specs[f"{root}.down_proj.weight"] = _linear(path + ("wo",), d, width)


def _moe_specs(specs: dict, cfg: DecoderConfig, i: int, fused: bool) -> None:
  d, f, e = cfg.hidden_size, cfg.expert_width, cfg.num_experts
  mlp = ("layers", i, "mlp")
  names = cfg.EXPERT_KEYS
  block = f"model.layers.{i}.{'mlp' if fused else names.block}"
  sigmoid = cfg.router_options["router"] == "sigmoid"   # HF keeps these two in f32
  specs[f"{block}.gate.weight"] = _linear(mlp + ("router",), e, d, float32=sigmoid)
  if sigmoid:
    specs[f"{block}.gate.e_score_correction_bias"] = TensorSpec(mlp + ("router_bias",), (e,),
                                                               float32=True)
  if cfg.shared_width:
    _swiglu_specs(specs, f"{block}.{names.shared}", ("layers", i, "shared_mlp"),
                  cfg.shared_width, d)
  if cfg.SHARED_GATE:
    specs[f"{block}.shared_expert_gate.weight"] = _linear(("layers", i, "shared_gate"), 1, d)
  if fused:
    stack = dict(all_experts=True, transpose=True)
    specs[f"{block}.experts.gate_up_proj"] = (
        TensorSpec(mlp + ("wi_gate",), (e, 2 * f, d), part=(1, 0, 2), **stack),
        TensorSpec(mlp + ("wi",), (e, 2 * f, d), part=(1, 1, 2), **stack))
    specs[f"{block}.experts.down_proj"] = TensorSpec(mlp + ("wo",), (e, d, f), **stack)
    return
  for leaf, name, shape in (("wi_gate", names.gate, (f, d)), ("wi", names.up, (f, d)),
                            ("wo", names.down, (d, f))):
    for x in range(e):
      specs[f"{block}.experts.{x}.{name}.weight"] = _linear(mlp + (leaf,), *shape, expert=x)


def hf_tensor_specs(cfg: DecoderConfig, *, fused: bool = False) -> dict:
  """Every HF key a checkpoint of `cfg` holds (per-expert or fused layout), in tree order."""
  d, v = cfg.hidden_size, cfg.vocab_size
  specs: dict = {"model.embed_tokens.weight": TensorSpec(("embed",), (v, d))}
  sparse = set(cfg.sparse_layers)
  for i in range(cfg.num_hidden_layers):
    layer = f"model.layers.{i}"
    specs[f"{layer}.input_layernorm.weight"] = TensorSpec(("layers", i, "attn_norm"), (d,))
    _attention_specs(specs, cfg, i)
    specs[f"{layer}.post_attention_layernorm.weight"] = TensorSpec(("layers", i, "mlp_norm"),
                                                                   (d,))
    if i in sparse:
      _moe_specs(specs, cfg, i, fused)
    else:
      _swiglu_specs(specs, f"{layer}.mlp", ("layers", i, "mlp"), cfg.intermediate_size, d)
  specs["model.norm.weight"] = TensorSpec(("final_norm",), (d,))
  if not cfg.tie_word_embeddings:
    specs["lm_head.weight"] = _linear(("lm_head",), v, d)
  return specs


def hf_key_map(cfg: DecoderConfig) -> KeyMap:
  """The `KeyMap` of a checkpoint of `cfg`: per-expert keys, with the fused layout as a variant."""
  describe = (f"the {type(cfg).__name__} (num_experts={cfg.num_experts}, "
              f"layers={cfg.num_hidden_layers}, MoE layers {list(cfg.sparse_layers)}, "
              f"hidden_size={cfg.hidden_size}, tie_word_embeddings={cfg.tie_word_embeddings})")
  tied = ({"lm_head.weight": (cfg.vocab_size, cfg.hidden_size)} if cfg.tie_word_embeddings
          else {})
  return KeyMap(specs=hf_tensor_specs(cfg), tied_copies=tied, num_experts=cfg.num_experts,
                describe=describe, layout=PER_EXPERT,
                variants={FUSED: hf_tensor_specs(cfg, fused=True)},
                hint="(Expert tensors may be per expert or fused, not both.)")
