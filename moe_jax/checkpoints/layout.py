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

Fused layouts (transformers 5 can save all experts of a layer as one 3-D tensor, and gate and up
projections concatenated): a spec with `all_experts=True` says the stored tensor already is the
whole expert stack, and a key whose tensor fills several leaves maps to a tuple of specs, each
naming its `part` (axis, index, count) of the stored tensor:

  key_map.specs["layers.0.mlp.experts.gate_up_proj"] == (                 # stored [E, 2 * f, d]
      TensorSpec(("layers", 0, "mlp", "wi_gate"), (E, 2 * f, d), all_experts=True,
                 transpose=True, part=(1, 0, 2)),                          # leaf [E, d, f]
      TensorSpec(("layers", 0, "mlp", "wi"), ..., part=(1, 1, 2)))

A family whose checkpoints come in more than one layout lists the others in `KeyMap.variants`;
the importer picks the one the files' keys belong to (`KeyMap.matching`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

TreePath = tuple[Any, ...]


class CheckpointError(ValueError):
  """A checkpoint on disk that cannot be used: a truncated or corrupt file, a refused pickle,
  tensors that do not match the model. The message names the file (and the tensor if known);
  launch scripts print it as one line."""


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
    all_experts: the stored tensor holds every expert on its leading axis (a fused layout), so
      the leaf is an expert stack although `expert` is None.
    part: (axis, index, count): the leaf is chunk `index` of `count` equal chunks of the stored
      tensor along its axis `axis` (taken before the transpose), or None: all of it.
    float32: the leaf stays float32 whatever dtype the model loads in (HF's
      `_keep_in_fp32_modules_strict`, e.g. DeepSeek's router and its selection bias).

  `transpose` swaps the last two axes (a matrix's transpose; per expert for a fused stack).
  """

  path: TreePath
  hf_shape: tuple[int, ...]
  expert: int | None = None
  transpose: bool = False
  fallback: str | None = None
  all_experts: bool = False
  part: tuple[int, int, int] | None = None
  float32: bool = False


Entry = TensorSpec | tuple[TensorSpec, ...]   # a key's spec, or one spec per part it fills


def spec_parts(entry: Entry) -> tuple[TensorSpec, ...]:
  """The specs of one key: (spec,) for a plain entry, the tuple of parts for a fused one."""
  return entry if isinstance(entry, tuple) else (entry,)


def to_leaf(tensor, spec: TensorSpec):
  """The leaf (slice) `spec` fills, cut from its stored tensor: the part, then the transpose."""
  if spec.part is not None:
    axis, index, count = spec.part
    size = tensor.shape[axis] // count
    tensor = tensor[(slice(None),) * axis + (slice(index * size, (index + 1) * size),)]
  return tensor.swapaxes(-1, -2) if spec.transpose else tensor


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """A family's checkpoint layout for one model configuration.

  Attributes:
    specs: checkpoint key -> `TensorSpec` (or a tuple of them for a key that fills several
      leaves), every key a checkpoint holds, in tree order.
    tied_copies: keys a checkpoint may also hold as copies of another tensor (ignored on import,
      never written), with their shapes.
    num_experts: E, the leading axis of every expert stack.
    describe: the model in the user's words, for error messages, e.g. "the SwitchConfig
      (num_experts=8, ...)".
    hint: what to check when a checkpoint does not match (appended to the error).
    layout: the name of this table's checkpoint layout (e.g. "per-expert"), for messages.
    variants: other layouts of the same tree: name -> specs (e.g. {"fused": ...}); see
      `matching` and `variant`.
  """

  specs: Mapping[str, Entry]
  tied_copies: Mapping[str, tuple[int, ...]]
  num_experts: int
  describe: str
  hint: str = ""
  layout: str = "default"
  variants: Mapping[str, Mapping[str, Entry]] = dataclasses.field(default_factory=dict)

  def entries(self) -> list[tuple[str, TensorSpec]]:
    """(key, spec) of every leaf (slice) a key fills, in tree order (a fused key once per part)."""
    return [(key, spec) for key, entry in self.specs.items() for spec in spec_parts(entry)]

  def stored_shape(self, key: str) -> tuple[int, ...]:
    """Shape of the checkpoint tensor `key`."""
    return tuple(spec_parts(self.specs[key])[0].hf_shape)

  def variant(self, name: str) -> "KeyMap":
    """This map with the layout `name` (one of `variants`, or its own) as its specs."""
    tables = {self.layout: self.specs, **self.variants}
    if name not in tables:
      raise ValueError(f"{self.describe} has no checkpoint layout {name!r}; known: "
                       f"{sorted(tables)}.")
    return dataclasses.replace(self, specs=tables.pop(name), layout=name, variants=tables)

  def matching(self, keys: Collection[str], where: str = "the checkpoint") -> "KeyMap":
    """The layout the checkpoint keys `keys` belong to (this one unless they are another's).

    A layout is recognised by its own keys (those no other layout has); keys of two layouts in
    one checkpoint are a one-line `CheckpointError`.
    """
    tables = {self.layout: self.specs, **self.variants}
    if len(tables) == 1:
      return self
    own = {name: [k for k in table if k in keys
                  and not any(k in other for n, other in tables.items() if n != name)]
           for name, table in tables.items()}
    present = [name for name, found in own.items() if found]
    if len(present) > 1:
      examples = " and ".join(f"{name} keys (e.g. {own[name][0]})" for name in present)
      raise CheckpointError(f"{where} mixes checkpoint layouts: {examples}; re-save it in one "
                            "layout.")
    return self if not present else self.variant(present[0])

  def leaf_shape(self, spec: TensorSpec) -> tuple[int, ...]:
    """Shape of the leaf `spec` fills: [E, in, out] for an expert slice, else the tensor's
    (its part, with the last two axes swapped if `spec.transpose`)."""
    shape = list(spec.hf_shape)
    if spec.part is not None:
      axis, _, count = spec.part
      shape[axis] //= count
    if spec.transpose:
      shape[-2], shape[-1] = shape[-1], shape[-2]
    if spec.expert is not None:
      shape = [self.num_experts] + shape
    return tuple(shape)

  def leaf_shapes(self) -> dict[TreePath, tuple[int, ...]]:
    """{tree path: leaf shape} of every leaf, in tree order."""
    return {spec.path: self.leaf_shape(spec) for _, spec in self.entries()}

  def param_shapes(self, dtype=jnp.float32) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct` leaves (no memory allocated)."""
    return build_tree({path: jax.ShapeDtypeStruct(shape, dtype)
                       for path, shape in self.leaf_shapes().items()})

  def float32_paths(self) -> frozenset[TreePath]:
    """Tree paths of the leaves that stay float32 whatever the load dtype (`TensorSpec.float32`)."""
    return frozenset(spec.path for _, spec in self.entries() if spec.float32)

  def expert_paths(self) -> frozenset[TreePath]:
    """Tree paths of the expert stacks (the leaves filled by expert slices or fused stacks)."""
    return frozenset(spec.path for _, spec in self.entries()
                     if spec.expert is not None or spec.all_experts)


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
