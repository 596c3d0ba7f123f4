"""Where every Switch parameter lives: Hugging Face state-dict keys -> leaves of our tree.

One table, `hf_tensor_specs(config)`, maps each key of a Hugging Face
`SwitchTransformersForConditionalGeneration` checkpoint to a leaf of the parameter tree (documented
in `config.py`); `hf_key_map(config)` wraps it into the `KeyMap` the family-agnostic checkpoint IO
(`moe_jax.checkpoints`) reads, so the key spelling lives in exactly one place.

  spec = hf_tensor_specs(cfg)["encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"]
  spec.path       == ("encoder", "blocks", 1, "ff", "wi")
  spec.expert     == 3          # fills wi[3]: the leaf is an expert stack [E, d_model, d_ff]
  spec.transpose  == True       # nn.Linear [out, in] -> Dense [in, out]
  spec.hf_shape   == (d_ff, d_model)
"""

from __future__ import annotations

from moe_jax.checkpoints.layout import KeyMap, TensorSpec
from moe_jax.models.switch.config import SwitchConfig
from moe_jax.models.switch.stack import STACKS


def hf_tensor_specs(config: SwitchConfig) -> dict[str, TensorSpec]:
  """Every HF key a checkpoint of `config` holds, in tree order, mapped to its destination."""
  c = config
  d, hk, f, e = c.d_model, c.num_heads * c.d_kv, c.d_ff, c.num_experts
  specs: dict[str, TensorSpec] = {"shared.weight": TensorSpec(("shared",), (c.vocab_size, d))}
  if not c.tie_word_embeddings:
    for stack in STACKS:
      specs[f"{stack}.embed_tokens.weight"] = TensorSpec(
          (f"{stack}_embed",), (c.vocab_size, d), fallback="shared.weight")
    specs["lm_head.weight"] = TensorSpec(("lm_head",), (c.vocab_size, d), transpose=True)
  for stack in STACKS:
    _stack_specs(specs, c, stack, d=d, hk=hk, f=f, e=e)
  return specs


def _stack_specs(specs, c: SwitchConfig, stack: str, *, d, hk, f, e) -> None:
  """Adds the keys of one stack to `specs`."""
  def linear(key, path, out_dim, in_dim, expert=None):
    specs[key] = TensorSpec(path, (out_dim, in_dim), expert=expert, transpose=True)

  root = f"{stack}.block"
  specs[f"{root}.0.layer.0.SelfAttention.relative_attention_bias.weight"] = TensorSpec(
      (stack, "relative_attention_bias"), (c.relative_attention_num_buckets, c.num_heads))
  sparse = set(c.sparse_blocks(stack))
  for i in range(c.num_blocks(stack)):
    block = (stack, "blocks", i)
    specs[f"{root}.{i}.layer.0.layer_norm.weight"] = TensorSpec(block + ("attn_norm",), (d,))
    for name in "qkv":
      linear(f"{root}.{i}.layer.0.SelfAttention.{name}.weight", block + ("attn", name), hk, d)
    linear(f"{root}.{i}.layer.0.SelfAttention.o.weight", block + ("attn", "o"), d, hk)
    if stack == "decoder":
      specs[f"{root}.{i}.layer.1.layer_norm.weight"] = TensorSpec(block + ("cross_norm",), (d,))
      for name in "qkv":
        linear(f"{root}.{i}.layer.1.EncDecAttention.{name}.weight", block + ("cross", name),
               hk, d)
      linear(f"{root}.{i}.layer.1.EncDecAttention.o.weight", block + ("cross", "o"), d, hk)
    ff = f"{root}.{i}.layer.{1 if stack == 'encoder' else 2}"
    specs[f"{ff}.layer_norm.weight"] = TensorSpec(block + ("ff_norm",), (d,))
    if i in sparse:
      linear(f"{ff}.mlp.router.classifier.weight", block + ("ff", "router"), e, d)
      for x in range(e):
        linear(f"{ff}.mlp.experts.expert_{x}.wi.weight", block + ("ff", "wi"), f, d, expert=x)
      for x in range(e):
        linear(f"{ff}.mlp.experts.expert_{x}.wo.weight", block + ("ff", "wo"), d, f, expert=x)
    else:
      linear(f"{ff}.mlp.wi.weight", block + ("ff", "wi"), f, d)
      linear(f"{ff}.mlp.wo.weight", block + ("ff", "wo"), d, f)
  specs[f"{stack}.final_layer_norm.weight"] = TensorSpec((stack, "final_norm"), (d,))


def tied_copies(config: SwitchConfig) -> dict[str, tuple[int, ...]]:
  """HF keys a tied checkpoint may hold as copies of `shared.weight` (ignored on import)."""
  if not config.tie_word_embeddings:
    return {}
  shape = (config.vocab_size, config.d_model)
  return {f"{stack}.embed_tokens.weight": shape for stack in STACKS} | {"lm_head.weight": shape}


def hf_key_map(config: SwitchConfig) -> KeyMap:
  """The `KeyMap` of a Switch checkpoint of `config` (expert stacks: every sparse wi / wo)."""
  c = config
  describe = (f"the SwitchConfig (num_experts={c.num_experts}, layers={c.num_layers}+"
              f"{c.num_decoder_layers}, sparse encoder blocks {list(c.sparse_blocks('encoder'))}, "
              f"decoder {list(c.sparse_blocks('decoder'))}, "
              f"tie_word_embeddings={c.tie_word_embeddings})")
  hint = "(Switch checkpoints with router_bias are not supported.)"
  if c.assumed_defaults:
    missing = ", ".join(key for key, _ in c.assumed_defaults)
    assumed = ", ".join(f"{key}={value}" for key, value in c.assumed_defaults)
    hint = f"config.json has no {missing}; assumed HF's default {assumed}. " + hint
  return KeyMap(specs=hf_tensor_specs(c), tied_copies=tied_copies(c), num_experts=c.num_experts,
                describe=describe, hint=hint)
