"""Hugging Face Switch Transformers checkpoints (safetensors) <-> the moe_jax parameter tree.

  config = SwitchConfig.from_hf_dir("switch-base-8")
  params = load_params("switch-base-8", config, mesh=moe_jax.make_mesh(data=2, expert=4))
  save_hf_safetensors(params, config, "/tmp/copy", max_shard_bytes=2 << 30)

The tree is the one documented in `moe_jax.models.switch_config`; which HF key fills which leaf is
`layout.hf_tensor_specs`. Import streams: each file is read one tensor at a time into a
preallocated leaf buffer of the requested dtype, and a leaf is moved to its device(s) and its host
buffer dropped as soon as its last tensor has arrived, so peak host memory is about one model plus
one leaf (one expert stack) rather than two models. With a mesh, expert stacks <f>[E, ...] are
placed sharded over the mesh's expert axis (each device receives only its E / D experts) and
every other leaf is replicated.

Only safetensors are read. Torch pickles (`pytorch_model*.bin`) are refused: convert them once
with `python launch/convert_hf.py --src=DIR --dst=NEW_DIR` (needs torch; uses weights_only=True).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints import layout
from moe_jax.checkpoints import safetensors_io
from moe_jax.models.switch_config import SwitchConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_MAX_LISTED_PROBLEMS = 20


@dataclasses.dataclass(frozen=True)
class TensorLocation:
  """Where one stored tensor is: its shape, safetensors dtype code and file."""

  shape: tuple[int, ...]
  dtype: str
  file: str


class SafetensorsSource:
  """The tensors of one checkpoint: a single `model.safetensors` or the shards of an index."""

  def __init__(self, files: Sequence[str], weight_map: dict[str, str] | None = None,
               index_file: str | None = None):
    self.files = list(files)
    self.weight_map = weight_map
    self.index_file = index_file

  def describe(self) -> str:
    return self.index_file or (self.files[0] if len(self.files) == 1 else str(self.files))

  def locate(self) -> dict[str, TensorLocation]:
    """Every tensor of every file, from the headers only; checks the index agrees with them."""
    found: dict[str, TensorLocation] = {}
    for file in self.files:
      with safetensors_io.ShardReader(file) as reader:
        for key, (shape, dtype) in reader.infos().items():
          if key in found:
            raise ValueError(f"tensor {key!r} is stored twice: in {found[key].file} and {file}; "
                             "re-export the checkpoint.")
          found[key] = TensorLocation(shape, dtype, file)
    for key, name in (self.weight_map or {}).items():
      expected_file = os.path.join(os.path.dirname(self.index_file), name)
      if key not in found or os.path.abspath(found[key].file) != os.path.abspath(expected_file):
        where = found[key].file if key in found else "no shard"
        raise ValueError(f"{self.index_file} maps {key!r} to {name}, but it is in {where}; the "
                         "index and its shards disagree: re-download or re-export the checkpoint.")
    return found

  def read(self, file: str, keys: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) for `keys` of `file`, one tensor alive at a time."""
    with safetensors_io.ShardReader(file) as reader:
      for key in keys:
        yield key, reader.get(key)


# --- finding the files ---

def _bin_refusal(path: str) -> ValueError:
  directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
  return ValueError(
      f"{path!r} holds PyTorch pickle weights (pytorch_model*.bin), which moe_jax does not load "
      "(unpickling can run code). Convert them once to safetensors with\n"
      f"  python launch/convert_hf.py --src={directory} --dst={directory.rstrip('/')}-safetensors\n"
      "(needs torch; it loads with weights_only=True), or download the repository's "
      "model.safetensors files (for some Switch checkpoints they are on a refs/pr/N revision).")


def open_safetensors(path: str) -> tuple[str, SafetensorsSource]:
  """(checkpoint directory, source) for a checkpoint directory, a .safetensors file or an index."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist.")
  if os.path.isfile(path):
    name = os.path.basename(path)
    directory = os.path.dirname(os.path.abspath(path))
    if name.endswith(".bin") or name.endswith(".bin.index.json") or name.endswith(".pt"):
      raise _bin_refusal(path)
    if name.endswith(".index.json"):
      return directory, _source_from_index(path)
    if name.endswith(".safetensors"):
      return directory, SafetensorsSource([path])
    raise ValueError(f"{path!r} is neither a .safetensors file nor a *.index.json; point at a "
                     "Hugging Face checkpoint directory.")
  index = os.path.join(path, INDEX_NAME)
  single = os.path.join(path, WEIGHTS_NAME)
  if os.path.exists(index):
    return path, _source_from_index(index)
  if os.path.exists(single):
    return path, SafetensorsSource([single])
  if glob.glob(os.path.join(path, "pytorch_model*.bin")):
    raise _bin_refusal(path)
  stray = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if stray:
    raise FileNotFoundError(f"{path!r} has {[os.path.basename(s) for s in stray]} but no "
                            f"{INDEX_NAME} saying which tensor is in which shard; download it too.")
  raise FileNotFoundError(f"{path!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; point at a "
                          "Hugging Face Switch checkpoint directory.")


def _source_from_index(index_file: str) -> SafetensorsSource:
  with open(index_file) as f:
    index = json.load(f)
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index_file} has no 'weight_map' {{tensor name: shard file}}; it is not a "
                     "safetensors index.")
  directory = os.path.dirname(index_file)
  names = sorted(set(weight_map.values()))
  files = [os.path.join(directory, n) for n in names]
  missing = [n for n, f in zip(names, files) if not os.path.exists(f)]
  if missing:
    raise FileNotFoundError(f"{index_file} lists shards {missing} that are not in {directory}; "
                            "download all shards.")
  return SafetensorsSource(files, weight_map, index_file)


# --- validation ---

def check_tensors(config: SwitchConfig, found: dict[str, TensorLocation], where: str) -> None:
  """ValueError listing every missing, unexpected, mis-shaped or non-float tensor (up to 20)."""
  specs = layout.hf_tensor_specs(config)
  tied = layout.tied_copies(config)
  problems = []
  for key, spec in specs.items():
    if key not in found and (spec.fallback is None or spec.fallback not in found):
      problems.append(f"missing {key}: expected shape {list(spec.hf_shape)}, found no such "
                      f"tensor in {where}")
  for key, loc in found.items():
    expected = specs[key].hf_shape if key in specs else tied.get(key)
    if expected is None:
      problems.append(f"unexpected {key}: shape {list(loc.shape)} in {loc.file} has no place in "
                      "this SwitchConfig's parameter tree")
    elif tuple(loc.shape) != tuple(expected):
      problems.append(f"wrong shape {key}: expected shape {list(expected)}, found "
                      f"{list(loc.shape)} in {loc.file}")
    elif loc.dtype not in _FLOAT_CODES:
      problems.append(f"wrong dtype {key}: expected a float tensor, found {loc.dtype} in "
                      f"{loc.file}")
  if problems:
    shown = problems[:_MAX_LISTED_PROBLEMS]
    if len(problems) > len(shown):
      shown.append(f"... and {len(problems) - len(shown)} more")
    raise ValueError(
        f"checkpoint {where} does not match the SwitchConfig (num_experts={config.num_experts}, "
        f"layers={config.num_layers}+{config.num_decoder_layers}, sparse encoder blocks "
        f"{list(config.sparse_blocks('encoder'))}, decoder "
        f"{list(config.sparse_blocks('decoder'))}, "
        f"tie_word_embeddings={config.tie_word_embeddings}); {len(problems)} problem(s):\n  "
        + "\n  ".join(shown) + "\nCheck that config.json belongs to these weights (router_bias "
        "checkpoints are not supported).")


# --- import ---

Placer = Callable[[layout.TreePath, np.ndarray], Any]


def device_placer(mesh: jax.sharding.Mesh | None = None, expert_axis: str = "expert") -> Placer:
  """(path, host array) -> jax.Array: default device, or the mesh with experts sharded."""
  # Blocking on each leaf lets its host buffer go before the next one is filled (device_put
  # copies asynchronously and keeps the source alive until the copy is done).
  if mesh is None:
    return lambda path, array: jax.block_until_ready(jax.device_put(array))

  def place(path, array):
    sharding = layout.leaf_sharding(path, array.shape, mesh, expert_axis)
    # Each device copies only the block its index selects: an expert slice, or all of a
    # replicated leaf.
    return jax.block_until_ready(
        jax.make_array_from_callback(array.shape, sharding, lambda index: array[index]))

  return place


def host_placer(path, array):
  """Keeps leaves as numpy arrays on the host (for converters that write them out again)."""
  del path
  return array


def assemble_params(source, config: SwitchConfig, *, dtype=jnp.float32,
                    place: Placer = host_placer) -> dict[str, Any]:
  """Streams `source`'s tensors into the parameter tree of `config`.

  Args:
    source: has `describe()`, `files`, `locate() -> {key: TensorLocation}` and
      `read(file, keys) -> iterator of (key, numpy array)` (`SafetensorsSource`, or the torch
      reader of `torch_bin`).
    config: the model the tensors must match exactly (see `check_tensors`).
    dtype: dtype of every leaf; each tensor is cast as it is read.
    place: called once per finished leaf with its host buffer; its result becomes the leaf.
  """
  np_dtype = np.dtype(dtype)
  specs = layout.hf_tensor_specs(config)
  found = source.locate()
  check_tensors(config, found, source.describe())
  # How many tensors each leaf still waits for; a leaf is placed the moment it reaches 0.
  remaining = collections.Counter(spec.path for key, spec in specs.items() if key in found)
  buffers: dict[layout.TreePath, np.ndarray] = {}
  leaves: dict[layout.TreePath, Any] = {}
  for file in source.files:
    keys = [key for key in specs if key in found and found[key].file == file]
    for key, tensor in source.read(file, keys):
      spec = specs[key]
      buffer = buffers.get(spec.path)
      if buffer is None:
        buffer = buffers[spec.path] = np.empty(layout.leaf_shape(spec, config), np_dtype)
      target = buffer if spec.expert is None else buffer[spec.expert]
      target[...] = tensor.T if spec.transpose else tensor  # casts, e.g. bf16 -> f32
      del tensor, target
      remaining[spec.path] -= 1
      if remaining[spec.path] == 0:
        leaves[spec.path] = place(spec.path, buffers.pop(spec.path))
        del buffer
  for spec in specs.values():
    if spec.path not in leaves:  # absent untied embedding: transformers 4 shared it
      leaves[spec.path] = leaves[specs[spec.fallback].path]
  return layout.build_tree({spec.path: leaves[spec.path] for spec in specs.values()})


def load_params(path: str, config: SwitchConfig | None = None, *, dtype=jnp.float32,
                mesh: jax.sharding.Mesh | None = None,
                expert_axis: str = "expert") -> dict[str, Any]:
  """Loads a Hugging Face Switch checkpoint (safetensors) into the moe_jax parameter tree.

  Args:
    path: checkpoint directory (with `model.safetensors` or `model.safetensors.index.json`), or
      one of those files.
    config: the model; default: read from the directory's config.json.
    dtype: dtype of every returned leaf (files may hold any float dtype, e.g. bf16).
    mesh: if given, expert stacks <dtype>[E, ...] are sharded over `expert_axis` and every other
      leaf is replicated on the mesh; else all leaves go to the default device.
    expert_axis: the mesh axis experts are split over.

  Returns:
    The tree documented in `moe_jax.models.switch_config` (jax.Array leaves).

  Raises:
    ValueError: a missing, unexpected or mis-shaped tensor (naming the key, both shapes and the
      file), torch `.bin` weights, or a mesh whose expert axis does not divide num_experts.
    FileNotFoundError: no weights, or config=None and no config.json.
  """
  directory, source = open_safetensors(path)
  if config is None:
    config = load_config(directory)
  if mesh is not None:
    layout.check_mesh(config, mesh, expert_axis)
  return assemble_params(source, config, dtype=dtype, place=device_placer(mesh, expert_axis))


def load_config(directory: str) -> SwitchConfig:
  """SwitchConfig from `directory`/config.json (FileNotFoundError naming the fix if absent)."""
  return SwitchConfig.from_hf_dir(directory)


# --- export ---

def hf_tensor(params_leaf: np.ndarray, spec: layout.TensorSpec) -> np.ndarray:
  """The HF tensor `spec` describes, cut from its (host) leaf: expert slice, then transpose."""
  tensor = params_leaf if spec.expert is None else params_leaf[spec.expert]
  return tensor.T if spec.transpose else tensor


def to_host(leaf) -> np.ndarray:
  """A host copy of a leaf, built shard by shard.

  `np.asarray(jax_array)` would cache the gathered copy on the array for its lifetime, doubling
  the host memory of every exported sharded leaf; this copy is dropped by the caller instead.
  """
  if not isinstance(leaf, jax.Array):
    return np.asarray(leaf)
  out = np.empty(leaf.shape, leaf.dtype)
  for shard in leaf.addressable_shards:
    out[shard.index] = np.asarray(shard.data)  # replicas rewrite the same values
  return out


def check_tree(params, config: SwitchConfig) -> dict[layout.TreePath, Any]:
  """{path: leaf} of `params`; ValueError naming a missing/extra leaf or a wrong shape."""
  flat = layout.flatten(params)
  expected = {spec.path: layout.leaf_shape(spec, config)
              for spec in layout.hf_tensor_specs(config).values()}
  problems = [f"missing leaf {layout.path_str(p)}: expected shape {list(s)}"
              for p, s in expected.items() if p not in flat]
  problems += [f"unexpected leaf {layout.path_str(p)}: shape {list(np.shape(v))}"
               for p, v in flat.items() if p not in expected]
  problems += [f"wrong shape {layout.path_str(p)}: expected {list(expected[p])}, found "
               f"{list(np.shape(v))}" for p, v in flat.items()
               if p in expected and tuple(np.shape(v)) != expected[p]]
  if problems:
    raise ValueError("params do not match the SwitchConfig:\n  " + "\n  ".join(problems[:20]))
  return flat


def shard_plan(sizes: Sequence[tuple[str, int]], max_shard_bytes: int | None) -> list[list[str]]:
  """Greedy split of (key, bytes) in order into shards of <= max_shard_bytes (a bigger tensor
  gets a shard of its own); one shard when max_shard_bytes is None."""
  if max_shard_bytes is None:
    return [[key for key, _ in sizes]]
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be > 0 (or None for one file), got {max_shard_bytes}.")
  shards: list[list[str]] = [[]]
  used = 0
  for key, size in sizes:
    if shards[-1] and used + size > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(key)
    used += size
  return shards


def save_hf_safetensors(params, config: SwitchConfig, path: str, *,
                        max_shard_bytes: int | None = None, dtype=None) -> list[str]:
  """Writes `params` as a Hugging Face checkpoint: config.json + safetensors in HF key layout.

  One `model.safetensors`, or (when the tensors exceed `max_shard_bytes`)
  `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`. Tensors are written one at
  a time (a leaf is copied to the host once, for all experts it holds). Tied models write
  `shared.weight` only, as transformers 5 does.

  Args:
    params: the tree of `moe_jax.models.switch_config` (numpy or jax arrays).
    config: its SwitchConfig.
    path: destination directory (created; existing weight files there are replaced).
    max_shard_bytes: largest shard; None: a single file.
    dtype: dtype to store (default: each leaf's own).

  Returns:
    The weight files written (shards, then the index if any).
  """
  flat = check_tree(params, config)
  specs = layout.hf_tensor_specs(config)
  os.makedirs(path, exist_ok=True)

  def stored_dtype(spec):
    return np.dtype(dtype if dtype is not None else flat[spec.path].dtype)

  sizes = [(key, safetensors_io.nbytes(spec.hf_shape, stored_dtype(spec)))
           for key, spec in specs.items()]
  shards = shard_plan(sizes, max_shard_bytes)
  names = ([WEIGHTS_NAME] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for stale in glob.glob(os.path.join(path, "model*.safetensors")) + [
      os.path.join(path, INDEX_NAME)]:
    if os.path.exists(stale):
      os.remove(stale)

  host_leaf: dict[str, Any] = {"path": None, "array": None}  # one leaf on the host at a time

  def get_tensor(key):
    spec = specs[key]
    if host_leaf["path"] != spec.path:
      host_leaf["array"] = None
      host_leaf["array"] = to_host(flat[spec.path])
      host_leaf["path"] = spec.path
    return hf_tensor(host_leaf["array"], spec).astype(stored_dtype(spec), copy=False)

  written = []
  weight_map = {}
  total = 0
  for name, keys in zip(names, shards):
    entries = [(key, specs[key].hf_shape, stored_dtype(specs[key])) for key in keys]
    file = os.path.join(path, name)
    total += safetensors_io.write_file(file, entries, get_tensor, metadata={"format": "pt"})
    weight_map.update({key: name for key in keys})
    written.append(file)
  host_leaf["array"] = None
  if len(shards) > 1:
    index_file = os.path.join(path, INDEX_NAME)
    with open(index_file, "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    written.append(index_file)
  write_config(config, path)
  return written


def write_config(config: SwitchConfig, path: str) -> str:
  """Writes config.json (HF field names) so transformers and `load_params` can read it."""
  hf = config.to_hf_dict()
  hf.setdefault("architectures", ["SwitchTransformersForConditionalGeneration"])
  file = os.path.join(path, CONFIG_NAME)
  with open(file, "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  return file
