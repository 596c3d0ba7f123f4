"""Hugging Face checkpoints (safetensors) <-> a moe_jax parameter tree, for any model family.

  key_map = family.hf_key_map(config)              # the family's table: HF key -> tree leaf
  params = load_params("ckpt-dir", key_map, mesh=moe_jax.make_mesh(data=2, expert=4))
  save_hf_safetensors(params, key_map, "/tmp/copy", config_json=config.to_hf_dict())

Which HF key fills which leaf is the family's `layout.KeyMap`; nothing here knows a model. Import
streams: each file is read one tensor at a time into a preallocated leaf buffer of the requested
dtype, and a leaf is moved to its device(s) and its host buffer dropped as soon as its last tensor
has arrived, so peak host memory is about one model plus one leaf (one expert stack) rather than
two models. With a mesh, expert stacks <f>[E, ...] (the leaves the key map fills by expert slices)
are placed sharded over the mesh's expert axis (each device receives only its E / D experts) and
every other leaf is replicated.

Only safetensors are read. Torch pickles (`pytorch_model*.bin`) are refused: convert them once
with `python launch/convert_hf.py --src=DIR --dst=NEW_DIR` (needs torch; uses weights_only=True).
"""

from __future__ import annotations

import collections
import glob
import json
import os
from typing import Any, Callable, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints import layout
from moe_jax.checkpoints import safetensors_io
from moe_jax.checkpoints.safetensors_io import (  # noqa: F401  (part of this module's API)
    INDEX_NAME, WEIGHTS_NAME, SafetensorsSource, TensorLocation, open_safetensors)

CONFIG_NAME = "config.json"
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_MAX_LISTED_PROBLEMS = 20


# --- validation ---

def check_tensors(key_map: layout.KeyMap, found: dict[str, TensorLocation], where: str) -> None:
  """CheckpointError listing every missing, unexpected, mis-shaped or non-float tensor (up to 20),
  after one line saying what to check (with the key map's `hint`)."""
  specs, tied = key_map.specs, key_map.tied_copies
  problems = []
  for key, entry in specs.items():
    spec = layout.spec_parts(entry)[0]
    if key not in found and (spec.fallback is None or spec.fallback not in found):
      problems.append(f"missing {key}: expected shape {list(spec.hf_shape)}, found no such "
                      f"tensor in {where}")
  for key, loc in found.items():
    expected = key_map.stored_shape(key) if key in specs else tied.get(key)
    if expected is None:
      problems.append(f"unexpected {key}: shape {list(loc.shape)} in {loc.file} has no place in "
                      "this model's parameter tree")
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
    hint = f" {key_map.hint}" if key_map.hint else ""
    raise layout.CheckpointError(
        f"checkpoint {where} does not match {key_map.describe}; check that config.json belongs "
        f"to these weights.{hint} {len(problems)} problem(s):\n  " + "\n  ".join(shown))


# --- import ---

Placer = Callable[[layout.TreePath, np.ndarray], Any]


def device_placer(mesh: jax.sharding.Mesh | None = None, expert_axis: str = "expert",
                  expert_paths: Collection[layout.TreePath] = ()) -> Placer:
  """(path, host array) -> jax.Array: default device, or the mesh with `expert_paths` sharded."""
  # Blocking on each leaf lets its host buffer go before the next one is filled (device_put
  # copies asynchronously and keeps the source alive until the copy is done).
  if mesh is None:
    return lambda path, array: jax.block_until_ready(jax.device_put(array))

  def place(path, array):
    sharding = layout.leaf_sharding(path in expert_paths, mesh, expert_axis)
    # Each device copies only the block its index selects: an expert slice, or all of a
    # replicated leaf.
    return jax.block_until_ready(
        jax.make_array_from_callback(array.shape, sharding, lambda index: array[index]))

  return place


def host_placer(path, array):
  """Keeps leaves as numpy arrays on the host (for converters that write them out again)."""
  del path
  return array


def assemble_params(source, key_map: layout.KeyMap, *, dtype=jnp.float32,
                    place: Placer = host_placer) -> dict[str, Any]:
  """Streams `source`'s tensors into the parameter tree `key_map` describes.

  Args:
    source: has `describe()`, `files`, `locate() -> {key: TensorLocation}` and
      `read(file, keys) -> iterator of (key, numpy array)` (`SafetensorsSource`, or the torch
      reader of `torch_bin`).
    key_map: the family's table for the model the tensors must match exactly (see
      `check_tensors`).
    dtype: dtype of every leaf (but those whose spec says `float32`); each tensor is cast as it
      is read.
    place: called once per finished leaf with its host buffer; its result becomes the leaf.
  """
  np_dtype = np.dtype(dtype)
  found = source.locate()
  key_map = key_map.matching(found, source.describe())   # e.g. per-expert or fused experts
  specs = key_map.specs
  check_tensors(key_map, found, source.describe())
  # How many tensors each leaf still waits for; a leaf is placed the moment it reaches 0.
  remaining = collections.Counter(spec.path for key, spec in key_map.entries() if key in found)
  buffers: dict[layout.TreePath, np.ndarray] = {}
  leaves: dict[layout.TreePath, Any] = {}
  for file in source.files:
    keys = [key for key in specs if key in found and found[key].file == file]
    for key, tensor in source.read(file, keys):
      done = _fill(tensor, specs[key], key_map, buffers, remaining, np_dtype)
      # The tensor goes before the leaves it completed are copied to their devices, so no leaf's
      # host buffer and device copy share the peak with the tensor too.
      del tensor
      for path in done:
        leaves[path] = place(path, buffers.pop(path))
  for _, spec in key_map.entries():
    if spec.path not in leaves:  # absent fallback key (e.g. untied embedding transformers 4 shared)
      leaves[spec.path] = leaves[layout.spec_parts(specs[spec.fallback])[0].path]
  return layout.build_tree({spec.path: leaves[spec.path] for _, spec in key_map.entries()})


def _fill(tensor: np.ndarray, entry: layout.Entry, key_map: layout.KeyMap,
          buffers: dict[layout.TreePath, np.ndarray], remaining: collections.Counter,
          np_dtype: np.dtype) -> list[layout.TreePath]:
  """Copies one stored tensor into the leaf buffers (or expert slices of them) its spec(s) fill,
  allocating a leaf's buffer at its first tensor; returns the leaves it completed."""
  done = []
  for spec in layout.spec_parts(entry):
    buffer = buffers.get(spec.path)
    if buffer is None:
      leaf_dtype = np.dtype(np.float32) if spec.float32 else np_dtype
      buffer = buffers[spec.path] = np.empty(key_map.leaf_shape(spec), leaf_dtype)
    target = buffer if spec.expert is None else buffer[spec.expert]
    target[...] = layout.to_leaf(tensor, spec)  # casts, e.g. bf16 -> f32
    remaining[spec.path] -= 1
    if remaining[spec.path] == 0:
      done.append(spec.path)
  return done


def load_params(path: str, key_map: layout.KeyMap, *, dtype=jnp.float32,
                mesh: jax.sharding.Mesh | None = None,
                expert_axis: str = "expert") -> dict[str, Any]:
  """Loads a Hugging Face checkpoint (safetensors) into the parameter tree `key_map` describes.

  Args:
    path: checkpoint directory (with `model.safetensors` or `model.safetensors.index.json`), or
      one of those files.
    key_map: the family's table for this model (`family.hf_key_map(config)`).
    dtype: dtype of every returned leaf (files may hold any float dtype, e.g. bf16).
    mesh: if given, expert stacks <dtype>[E, ...] are sharded over `expert_axis` and every other
      leaf is replicated on the mesh; else all leaves go to the default device.
    expert_axis: the mesh axis experts are split over.

  Returns:
    The family's parameter tree (jax.Array leaves).

  Raises:
    ValueError: a missing, unexpected or mis-shaped tensor (naming the key, both shapes and the
      file), torch `.bin` weights, or a mesh whose expert axis does not divide num_experts.
    FileNotFoundError: no weights.
  """
  _, source = open_safetensors(path)
  if mesh is not None:
    layout.check_mesh(key_map.num_experts, mesh, expert_axis)
  place = device_placer(mesh, expert_axis, key_map.expert_paths())
  return assemble_params(source, key_map, dtype=dtype, place=place)


def read_config(directory: str) -> dict[str, Any]:
  """`directory`/config.json as a dict (FileNotFoundError naming the fix if absent)."""
  file = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(file):
    raise FileNotFoundError(f"no config.json in {directory!r}: point at a Hugging Face checkpoint "
                            "directory (config.json + model.safetensors).")
  return safetensors_io.read_json(file)


# --- export ---

def hf_tensor(params_leaf: np.ndarray, spec: layout.TensorSpec) -> np.ndarray:
  """The HF tensor (or, for a `part` spec, its part) `spec` describes, cut from its (host) leaf:
  expert slice, then transpose."""
  tensor = params_leaf if spec.expert is None else params_leaf[spec.expert]
  return tensor.swapaxes(-1, -2) if spec.transpose else tensor


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


def check_tree(params, key_map: layout.KeyMap) -> dict[layout.TreePath, Any]:
  """{path: leaf} of `params`; ValueError naming a missing/extra leaf or a wrong shape."""
  flat = layout.flatten(params)
  expected = key_map.leaf_shapes()
  problems = [f"missing leaf {layout.path_str(p)}: expected shape {list(s)}"
              for p, s in expected.items() if p not in flat]
  problems += [f"unexpected leaf {layout.path_str(p)}: shape {list(np.shape(v))}"
               for p, v in flat.items() if p not in expected]
  problems += [f"wrong shape {layout.path_str(p)}: expected {list(expected[p])}, found "
               f"{list(np.shape(v))}" for p, v in flat.items()
               if p in expected and tuple(np.shape(v)) != expected[p]]
  if problems:
    raise ValueError(f"params do not match {key_map.describe}:\n  "
                     + "\n  ".join(problems[:_MAX_LISTED_PROBLEMS]))
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


def save_hf_safetensors(params, key_map: layout.KeyMap, path: str, *, config_json: dict,
                        max_shard_bytes: int | None = None, dtype=None) -> list[str]:
  """Writes `params` as a Hugging Face checkpoint: config.json + safetensors in HF key layout.

  One `model.safetensors`, or (when the tensors exceed `max_shard_bytes`)
  `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`. Tensors are written one at
  a time (a leaf is copied to the host once, for all experts it holds). Keys in
  `key_map.tied_copies` are not written (transformers 5 writes a tied embedding once).

  Args:
    params: the family's parameter tree (numpy or jax arrays).
    key_map: its table (`family.hf_key_map(config)`).
    path: destination directory (created; existing weight files there are replaced).
    config_json: the config.json fields (e.g. `config.to_hf_dict()`).
    max_shard_bytes: largest shard; None: a single file.
    dtype: dtype to store (default: each leaf's own).

  Returns:
    The weight files written (shards, then the index if any).
  """
  flat = check_tree(params, key_map)
  specs = key_map.specs
  os.makedirs(path, exist_ok=True)

  def stored_dtype(entry):
    spec = layout.spec_parts(entry)[0]
    return np.dtype(dtype if dtype is not None else flat[spec.path].dtype)

  sizes = [(key, safetensors_io.nbytes(key_map.stored_shape(key), stored_dtype(entry)))
           for key, entry in specs.items()]
  shards = shard_plan(sizes, max_shard_bytes)
  names = ([WEIGHTS_NAME] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  _remove_weights(path)

  host_leaf: dict[str, Any] = {"path": None, "array": None}  # one leaf on the host at a time

  def leaf_part(spec):
    if host_leaf["path"] != spec.path:
      host_leaf["array"] = None
      host_leaf["array"] = to_host(flat[spec.path])
      host_leaf["path"] = spec.path
    return hf_tensor(host_leaf["array"], spec)

  def get_tensor(key):
    parts = layout.spec_parts(specs[key])
    if len(parts) == 1 and parts[0].part is None:
      return leaf_part(parts[0]).astype(stored_dtype(parts[0]), copy=False)
    # A fused tensor: its parts (e.g. gate and up projections), concatenated back in order.
    ordered = sorted(parts, key=lambda spec: spec.part[1])
    return np.concatenate([leaf_part(spec).astype(stored_dtype(spec)) for spec in ordered],
                          axis=ordered[0].part[0])

  written = []
  weight_map = {}
  total = 0
  for name, keys in zip(names, shards):
    entries = [(key, key_map.stored_shape(key), stored_dtype(specs[key])) for key in keys]
    file = os.path.join(path, name)
    total += safetensors_io.write_file(file, entries, get_tensor, metadata={"format": "pt"})
    weight_map.update({key: name for key in keys})
    written.append(file)
  host_leaf["array"] = None
  if len(shards) > 1:
    written.append(_write_index(path, total, weight_map))
  write_config(config_json, path)
  return written


def _remove_weights(path: str) -> None:
  """Deletes the weight files and index a previous export left in `path`."""
  for stale in glob.glob(os.path.join(path, "model*.safetensors")) + [
      os.path.join(path, INDEX_NAME)]:
    if os.path.exists(stale):
      os.remove(stale)


def _write_index(path: str, total_bytes: int, weight_map: dict[str, str]) -> str:
  """Writes `model.safetensors.index.json` ({key: shard file name}) in `path`; returns it."""
  index_file = os.path.join(path, INDEX_NAME)
  with open(index_file, "w") as f:
    json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
  return index_file


def write_config(config_json: dict, path: str) -> str:
  """Writes `config_json` as `path`/config.json, so transformers and the family can read it."""
  file = os.path.join(path, CONFIG_NAME)
  with open(file, "w") as f:
    json.dump(config_json, f, indent=2, sort_keys=True)
  return file
