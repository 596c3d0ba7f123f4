"""Where every Switch parameter lives: our tree (see `moe_jax.models.switch_config`) and HF keys.

One table, `hf_tensor_specs(config)`, maps each Hugging Face state-dict key to a leaf of our
parameter tree; the importer, the exporter and the torch converter all read it, so the key
spelling lives in exactly one place.

  spec = hf_tensor_specs(cfg)["encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"]
  spec.path       == ("encoder", "blocks", 1, "ff", "wi")
  spec.expert     == 3          # fills wi[3]
  spec.transpose  == True       # nn.Linear [out, in] -> Dense [in, out]
  spec.hf_shape   == (d_ff, d_model)

Tree paths are tuples of dict keys (str) and list indices (int).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.models.switch_config import SwitchConfig

TreePath = tuple[Any, ...]
STACKS = ("encoder", "decoder")
EXPERT_STACK_NAMES = ("wi", "wo")  # [E, ...] leaves of a sparse block's "ff"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor and the leaf (or expert slice of a leaf) it fills.

  Attributes:
    path: tree path of the destination leaf.
    hf_shape: shape of the tensor in the HF file.
    expert: index into the leading E axis of the leaf, or None when the tensor is the whole leaf.
    transpose: the leaf (slice) is the 2-D transpose of the HF tensor.
    fallback: HF key whose leaf this leaf copies when the key is absent from the files (untied
      embeddings saved by transformers 4, which always shared them), or None: the key is required.
  """

  path: TreePath
  hf_shape: tuple[int, ...]
  expert: int | None = None
  transpose: bool = False
  fallback: str | None = None


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

  def linear(key, path, out_dim, in_dim, expert=None):
    specs[key] = TensorSpec(path, (out_dim, in_dim), expert=expert, transpose=True)

  for stack in STACKS:
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
  return specs


def tied_copies(config: SwitchConfig) -> dict[str, tuple[int, ...]]:
  """HF keys a tied checkpoint may hold as copies of `shared.weight` (ignored on import)."""
  if not config.tie_word_embeddings:
    return {}
  shape = (config.vocab_size, config.d_model)
  return {key: shape for key in
          ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}


def leaf_shape(spec: TensorSpec, config: SwitchConfig) -> tuple[int, ...]:
  """Shape of the leaf `spec` fills: [E, in, out] for an expert slice, else the tensor's
  (transposed if `spec.transpose`)."""
  shape = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape
  if spec.expert is not None:
    shape = (config.num_experts,) + shape
  return tuple(shape)


def param_shapes(config: SwitchConfig, dtype=jnp.float32) -> dict[str, Any]:
  """The parameter tree of `config` as `jax.ShapeDtypeStruct` leaves (no memory allocated)."""
  leaves = {spec.path: leaf_shape(spec, config) for spec in hf_tensor_specs(config).values()}
  return build_tree({path: jax.ShapeDtypeStruct(shape, dtype) for path, shape in leaves.items()})


def build_tree(leaves: dict[TreePath, Any]) -> dict[str, Any]:
  """Nested dicts/lists from {path: leaf}; int path entries become list positions (0, 1, ...)."""
  root: dict[str, Any] = {}
  for path, leaf in leaves.items():
    node = root
    for key, next_key in zip(path[:-1], path[1:]):
      if isinstance(node, list):
        while len(node) <= key:
          node.append(None)
      child = node[key] if isinstance(node, list) else node.get(key)
      if child is None:
        child = [] if isinstance(next_key, int) else {}
        node[key] = child
      node = child
    if isinstance(node, list):
      while len(node) <= path[-1]:
        node.append(None)
    node[path[-1]] = leaf
  return root


def tree_path(jax_path) -> TreePath:
  """A `jax.tree_util` key path as a plain tuple of dict keys / list indices."""
  out = []
  for k in jax_path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    else:
      out.append(str(k))
  return tuple(out)


def flatten(tree) -> dict[TreePath, Any]:
  """{path: leaf} of a parameter tree, in jax's flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tree_path(p): leaf for p, leaf in flat}


def path_str(path: TreePath) -> str:
  """("encoder", "blocks", 1, "ff", "wi") -> "encoder/blocks/1/ff/wi"."""
  return "/".join(str(k) for k in path)


def is_expert_stack(path: TreePath, shape: tuple[int, ...]) -> bool:
  """True for a sparse block's stacked expert weights <f>[E, ...] (sharded over 'expert')."""
  return len(path) >= 2 and path[-2] == "ff" and path[-1] in EXPERT_STACK_NAMES and len(shape) == 3


def leaf_sharding(path: TreePath, shape: tuple[int, ...], mesh: jax.sharding.Mesh,
                  expert_axis: str = "expert") -> NamedSharding:
  """Expert stacks split over `expert_axis` on their E axis; everything else replicated."""
  if is_expert_stack(path, shape):
    return NamedSharding(mesh, P(expert_axis))
  return NamedSharding(mesh, P())


def check_mesh(config_or_experts, mesh: jax.sharding.Mesh, expert_axis: str = "expert") -> None:
  """ValueError unless `mesh` has `expert_axis` and its size divides the number of experts."""
  num_experts = getattr(config_or_experts, "num_experts", config_or_experts)
  if expert_axis not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)} lack expert_axis={expert_axis!r}; build "
                     "the mesh with moe_jax.make_mesh(data=..., expert=...) or pass expert_axis=.")
  size = mesh.shape[expert_axis]
  if num_experts % size:
    raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's {expert_axis!r} "
                     f"axis of size {size}; choose an expert axis size that divides it.")
