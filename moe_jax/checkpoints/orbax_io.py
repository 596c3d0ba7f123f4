"""Save / restore a parameter tree with orbax, sharded over a mesh on restore; any model family.

  save_params("/ckpt/switch8", params, config_json=config.to_hf_dict(), family="switch",
              key_map=key_map, metadata={"source": "google/switch-base-8"})
  params = restore_params("/ckpt/switch8", mesh=moe_jax.make_mesh(data=2, expert=4))
  config_json, family = load_config("/ckpt/switch8"), load_family("/ckpt/switch8")

On disk:
  PATH/params/          the orbax checkpoint (StandardCheckpointer)
  PATH/moe_jax.json     the manifest: {"format", "family", "config", "metadata",
                        "leaves": [{"path", "shape", "dtype", "expert"}]}

The manifest records every leaf's tree path, shape, dtype and whether it is an expert stack
(sharded over the mesh's expert axis on its leading E axis when restored on a mesh; every other leaf
is replicated), so restoring needs no orbax-version-specific metadata API and no model code: the
abstract tree (with shardings) is rebuilt from it, and a `target` is checked against it before
orbax reads anything. It also stores the model's config as a dict (config.json fields) and the
name of its family (`moe_jax.models`), which the caller turns back into a typed config.

Older manifests (format `moe_jax.params/1`: no "family", no "expert" flags; e.g. the shipped
switch_tiny) are read with the rule their checkpoints were written under: a 3-D leaf whose path
ends in ("ff", "wi" | "wo" | "wi_gate") is an expert stack.
"""

from __future__ import annotations

import json
import os
from typing import Any, Collection

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe_jax.checkpoints import layout

FORMAT = "moe_jax.params/2"
LEGACY_FORMAT = "moe_jax.params/1"
_LEGACY_EXPERT_NAMES = ("wi", "wo", "wi_gate")
# Bytes orbax may hold in flight while writing / reading. Its default (96 GB) lets a save of
# random-valued (incompressible) weights buffer ~0.8 x the model on top of it; 2 GB bounds that.
CONCURRENT_GB = 2
MANIFEST_NAME = "moe_jax.json"
PARAMS_DIR = "params"


def _checkpointer():
  """StandardCheckpointer where orbax has it (0.5+), else the older PyTreeCheckpointer."""
  cls = getattr(ocp, "StandardCheckpointer", None) or ocp.PyTreeCheckpointer
  try:
    return cls(save_concurrent_gb=CONCURRENT_GB, restore_concurrent_gb=CONCURRENT_GB)
  except TypeError:  # an orbax whose handler does not take these limits
    return cls()


def _close(checkpointer) -> None:
  for name in ("wait_until_finished", "close"):
    fn = getattr(checkpointer, name, None)
    if fn is not None:
      fn()


def save_params(path: str, params, *, config_json: dict | None = None, family: str | None = None,
                key_map: layout.KeyMap | None = None,
                expert_paths: Collection[layout.TreePath] = (), metadata: dict | None = None,
                force: bool = False) -> str:
  """Saves `params` (numpy or jax leaves) with orbax under `path`, plus a JSON manifest.

  Args:
    path: a new directory (or an existing one with force=True: replaced).
    params: nested dicts/lists of arrays.
    config_json: the model's config as a JSON dict (e.g. `config.to_hf_dict()`; `load_config`).
    family: the model family's name in `moe_jax.models` (`load_family`).
    key_map: the family's `KeyMap` of this model: its expert stacks are recorded as such (the
      usual way to give `expert_paths`).
    expert_paths: tree paths of the expert stacks <f>[E, ...], sharded over the expert axis when
      restored on a mesh; every other leaf is replicated. Default: `key_map`'s, else none.
    metadata: JSON-serialisable dict stored beside the checkpoint (`load_metadata`).
    force: overwrite an existing checkpoint at `path`.

  Returns:
    The absolute checkpoint directory.
  """
  path = os.path.abspath(path)
  manifest_file = os.path.join(path, MANIFEST_NAME)
  if os.path.exists(os.path.join(path, PARAMS_DIR)) and not force:
    raise ValueError(f"{path!r} already holds a checkpoint; pass force=True (convert_hf.py: "
                     "--force) to replace it or choose a new directory.")
  flat = layout.flatten(params)
  if key_map is not None:
    if expert_paths:
      raise ValueError("give key_map or expert_paths, not both (key_map implies its expert_paths).")
    expert_paths = key_map.expert_paths()
  expert_paths = {tuple(p) for p in expert_paths}
  unknown = sorted(layout.path_str(p) for p in expert_paths - set(flat))
  if unknown:
    raise ValueError(f"expert_paths {unknown} are not leaves of params; pass the key map's "
                     "expert_paths() of the model these params belong to.")
  manifest = {
      "format": FORMAT,
      "family": family,
      "leaves": [{"path": list(p), "shape": list(np.shape(v)), "dtype": np.dtype(v.dtype).name,
                  "expert": p in expert_paths} for p, v in flat.items()],
      "config": config_json,
      "metadata": metadata,
  }
  text = json.dumps(manifest, indent=1)  # fails here, before writing, if metadata is not JSON
  os.makedirs(path, exist_ok=True)
  checkpointer = _checkpointer()
  try:
    checkpointer.save(os.path.join(path, PARAMS_DIR), params, force=force)
  finally:
    _close(checkpointer)
  with open(manifest_file, "w") as f:
    f.write(text)
  return path


def _read_manifest(path: str) -> dict:
  file = os.path.join(path, MANIFEST_NAME)
  if not os.path.exists(file):
    raise FileNotFoundError(f"no {MANIFEST_NAME} in {path!r}: not a checkpoint written by "
                            "moe_jax.checkpoints.orbax_io.save_params.")
  with open(file) as f:
    manifest = json.load(f)
  if manifest.get("format") not in (FORMAT, LEGACY_FORMAT):
    raise ValueError(f"{file} has format {manifest.get('format')!r}; this moe_jax reads "
                     f"{FORMAT!r} and {LEGACY_FORMAT!r}.")
  return manifest


def load_metadata(path: str) -> dict | None:
  """The `metadata` dict passed to `save_params`."""
  return _read_manifest(os.path.abspath(path))["metadata"]


def load_config(path: str) -> dict | None:
  """The config dict passed to `save_params` as `config_json` (None if none was).

  Its family is `load_family(path)`, or, for checkpoints that did not record one, the family whose
  `model_type` the dict names (`moe_jax.models.family_for_model_type`).
  """
  return _read_manifest(os.path.abspath(path))["config"]


def load_family(path: str) -> str | None:
  """The family name passed to `save_params` (None if none was, or the manifest predates it)."""
  return _read_manifest(os.path.abspath(path)).get("family")


def _is_legacy_expert_stack(path: layout.TreePath, shape: tuple[int, ...]) -> bool:
  """How format-1 checkpoints marked expert stacks: by name and rank."""
  return (len(path) >= 2 and path[-2] == "ff" and path[-1] in _LEGACY_EXPERT_NAMES
          and len(shape) == 3)


def _stored_leaves(manifest: dict) -> tuple[dict[layout.TreePath, jax.ShapeDtypeStruct],
                                            frozenset[layout.TreePath]]:
  """({path: ShapeDtypeStruct}, expert stack paths) of a manifest."""
  legacy = manifest["format"] == LEGACY_FORMAT
  stored, experts = {}, set()
  for leaf in manifest["leaves"]:
    path, shape = tuple(leaf["path"]), tuple(leaf["shape"])
    stored[path] = jax.ShapeDtypeStruct(shape, np.dtype(leaf["dtype"]))
    if _is_legacy_expert_stack(path, shape) if legacy else leaf["expert"]:
      experts.add(path)
  return stored, frozenset(experts)


def _check_target(stored: dict, target: dict, where: str) -> None:
  problems = [f"{layout.path_str(p)}: in target, not in the checkpoint (shape "
              f"{list(np.shape(v))})" for p, v in target.items() if p not in stored]
  problems += [f"{layout.path_str(p)}: in the checkpoint (shape {list(s.shape)}), not in target"
               for p, s in stored.items() if p not in target]
  problems += [f"{layout.path_str(p)}: target shape {list(np.shape(v))}, checkpoint shape "
               f"{list(stored[p].shape)}" for p, v in target.items()
               if p in stored and tuple(np.shape(v)) != stored[p].shape]
  if problems:
    raise ValueError(f"checkpoint {where} does not match target ({len(problems)} problem(s)):\n  "
                     + "\n  ".join(problems[:20]))


def restore_params(path: str, *, mesh: jax.sharding.Mesh | None = None, target=None,
                   expert_axis: str = "expert") -> dict[str, Any]:
  """Restores a tree saved by `save_params` as jax.Arrays.

  Args:
    path: the directory given to `save_params`.
    mesh: if given, the manifest's expert stacks [E, ...] are sharded over `expert_axis` and every
      other leaf is replicated; else leaves take `target`'s shardings when it has them, or the
      default device.
    target: optional tree (arrays or jax.ShapeDtypeStruct) the checkpoint must match; its
      structure and dtypes are used for the result.
    expert_axis: the mesh axis experts are split over.

  Raises:
    ValueError: `target` differs from the checkpoint (naming the tree path and both shapes), or
      the mesh's expert axis does not divide an expert stack.
  """
  path = os.path.abspath(path)
  manifest = _read_manifest(path)
  stored, expert_paths = _stored_leaves(manifest)
  if target is not None:
    target_flat = layout.flatten(target)
    _check_target(stored, target_flat, path)
    abstract = {p: jax.ShapeDtypeStruct(stored[p].shape, getattr(v, "dtype", stored[p].dtype),
                                        sharding=getattr(v, "sharding", None))
                for p, v in target_flat.items()}
  else:
    abstract = stored
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def with_sharding(p, s):
    if mesh is not None:
      if p in expert_paths:
        layout.check_mesh(s.shape[0], mesh, expert_axis)
      sharding = layout.leaf_sharding(p in expert_paths, mesh, expert_axis)
    else:
      sharding = getattr(s, "sharding", None) or default
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)

  abstract = {p: with_sharding(p, s) for p, s in abstract.items()}
  if target is not None:
    treedef = jax.tree_util.tree_structure(target)
    abstract_tree = jax.tree_util.tree_unflatten(treedef, list(abstract.values()))
  else:
    abstract_tree = layout.build_tree(abstract)
  checkpointer = _checkpointer()
  try:
    return checkpointer.restore(os.path.join(path, PARAMS_DIR), abstract_tree)
  finally:
    _close(checkpointer)
