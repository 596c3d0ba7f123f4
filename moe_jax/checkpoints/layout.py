"""Where every parameter lives: a family's key map (checkpoint key -> tree leaf) and shardings.

A model family describes its checkpoint layout with one declarative table, a `KeyMap`: each
checkpoint key (a Hugging Face state-dict name) maps to a `TensorSpec` naming the leaf of the
parameter tree it fills, and, for a per-expert tensor, the expert slice of that leaf. The importer,
the exporter and the converters all read that one table, so a family spells its keys in exactly one
place and everything here stays family-agnostic.

  spec = key_map.specs["block.1.mlp.experts.expert_3.wi.weight"]      # a hypothetical key
  spec.path       == ("blocks", 1, "ff", "wi")
  spec.expert     == 3          # fills wi[3]
  spec.transpose  == True       # nn.Linear [out, in] -> Dense [in, out]
  spec.hf_shape   == (d_ff, d_model)

A leaf filled by expert slices is an expert stack <f>[E, ...]: on a mesh it is sharded over the
expert axis on its leading E axis; every other leaf is replicated. Tree paths are tuples of dict
keys (str) and list indices (int).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

TreePath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor and the leaf (or expert slice of a leaf) it fills.

  Attributes:
    path: tree path of the destination leaf.
    hf_shape: shape of the tensor in the checkpoint file.
    expert: index into the leading E axis of the leaf, or None when the tensor is the whole leaf.
    transpose: the leaf (slice) is the 2-D transpose of the stored tensor.
    fallback: key whose leaf this leaf copies when the key is absent from the files (e.g. untied
      embeddings saved by transformers 4, which always shared them), or None: the key is required.
  """

  path: TreePath
  hf_shape: tuple[int, ...]
  expert: int | None = None
  transpose: bool = False
  fallback: str | None = None


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """A family's checkpoint layout for one model configuration.

  Attributes:
    specs: checkpoint key -> `TensorSpec`, every key a checkpoint holds, in tree order.
    tied_copies: keys a checkpoint may also hold as copies of another tensor (ignored on import,
      never written), with their shapes.
    num_experts: E, the leading axis of every expert stack.
    describe: the model in the user's words, for error messages, e.g. "the SwitchConfig
      (num_experts=8, ...)".
    hint: what to check when a checkpoint does not match (appended to the error).
  """

  specs: Mapping[str, TensorSpec]
  tied_copies: Mapping[str, tuple[int, ...]]
  num_experts: int
  describe: str
  hint: str = ""

  def leaf_shape(self, spec: TensorSpec) -> tuple[int, ...]:
    """Shape of the leaf `spec` fills: [E, in, out] for an expert slice, else the tensor's
    (transposed if `spec.transpose`)."""
    shape = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape
    if spec.expert is not None:
      shape = (self.num_experts,) + tuple(shape)
    return tuple(shape)

  def leaf_shapes(self) -> dict[TreePath, tuple[int, ...]]:
    """{tree path: leaf shape} of every leaf, in tree order."""
    return {spec.path: self.leaf_shape(spec) for spec in self.specs.values()}

  def param_shapes(self, dtype=jnp.float32) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct` leaves (no memory allocated)."""
    return build_tree({path: jax.ShapeDtypeStruct(shape, dtype)
                       for path, shape in self.leaf_shapes().items()})

  def expert_paths(self) -> frozenset[TreePath]:
    """Tree paths of the expert stacks (the leaves filled by expert slices)."""
    return frozenset(spec.path for spec in self.specs.values() if spec.expert is not None)


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
  """("blocks", 1, "ff", "wi") -> "blocks/1/ff/wi"."""
  return "/".join(str(k) for k in path)


def leaf_sharding(is_expert_stack: bool, mesh: jax.sharding.Mesh,
                  expert_axis: str = "expert") -> NamedSharding:
  """An expert stack <f>[E, ...] split over `expert_axis` on its E axis; else replicated."""
  return NamedSharding(mesh, P(expert_axis) if is_expert_stack else P())


def check_mesh(num_experts: int, mesh: jax.sharding.Mesh, expert_axis: str = "expert") -> None:
  """ValueError unless `mesh` has `expert_axis` and its size divides `num_experts`."""
  if expert_axis not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)} lack expert_axis={expert_axis!r}; build "
                     "the mesh with moe_jax.make_mesh(data=..., expert=...) or pass expert_axis=.")
  size = mesh.shape[expert_axis]
  if num_experts % size:
    raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's {expert_axis!r} "
                     f"axis of size {size}; choose an expert axis size that divides it.")
