"""Save / restore a parameter tree with orbax, sharded over a mesh on restore.

  save_params("/ckpt/switch8", params, config=config, metadata={"source": "google/switch-base-8"})
  params = restore_params("/ckpt/switch8", mesh=moe_jax.make_mesh(data=2, expert=4))
  config = load_config("/ckpt/switch8")

On disk:
  PATH/params/          the orbax checkpoint (StandardCheckpointer)
  PATH/moe_jax.json     {"format", "leaves": [{"path", "shape", "dtype"}], "config", "metadata"}

The manifest `moe_jax.json` records every leaf's tree path, shape and dtype, so restoring needs no
orbax-version-specific metadata API: the abstract tree (with shardings) is rebuilt from it, and a
`target` is checked against it before orbax reads anything.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe_jax.checkpoints import layout
from moe_jax.models.switch_config import SwitchConfig

FORMAT = "moe_jax.params/1"
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


def save_params(path: str, params, *, metadata: dict | None = None,
                config: SwitchConfig | None = None, force: bool = False) -> str:
  """Saves `params` (numpy or jax leaves) with orbax under `path`, plus a JSON manifest.

  Args:
    path: a new directory (or an existing one with force=True: replaced).
    params: nested dicts/lists of arrays.
    metadata: JSON-serialisable dict stored beside the checkpoint (`load_metadata`).
    config: a SwitchConfig to store with it (`load_config`).
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
  manifest = {
      "format": FORMAT,
      "leaves": [{"path": list(p), "shape": list(np.shape(v)), "dtype": np.dtype(v.dtype).name}
                 for p, v in flat.items()],
      "config": config.to_hf_dict() if config is not None else None,
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
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{file} has format {manifest.get('format')!r}; this moe_jax reads "
                     f"{FORMAT!r}.")
  return manifest


def load_metadata(path: str) -> dict | None:
  """The `metadata` dict passed to `save_params`."""
  return _read_manifest(os.path.abspath(path))["metadata"]


def load_config(path: str) -> SwitchConfig | None:
  """The SwitchConfig passed to `save_params` (None if none was)."""
  hf = _read_manifest(os.path.abspath(path))["config"]
  return None if hf is None else SwitchConfig.from_hf_dict(hf)


def _stored_leaves(manifest: dict) -> dict[layout.TreePath, jax.ShapeDtypeStruct]:
  return {tuple(leaf["path"]): jax.ShapeDtypeStruct(tuple(leaf["shape"]), np.dtype(leaf["dtype"]))
          for leaf in manifest["leaves"]}


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
    mesh: if given, expert stacks [E, ...] are sharded over `expert_axis` and every other leaf is
      replicated; else leaves take `target`'s shardings when it has them, or the default device.
    target: optional tree (arrays or jax.ShapeDtypeStruct) the checkpoint must match; its
      structure and dtypes are used for the result.
    expert_axis: the mesh axis experts are split over.

  Raises:
    ValueError: `target` differs from the checkpoint (naming the tree path and both shapes), or
      the mesh's expert axis does not divide an expert stack.
  """
  path = os.path.abspath(path)
  manifest = _read_manifest(path)
  stored = _stored_leaves(manifest)
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
      if layout.is_expert_stack(p, s.shape):
        layout.check_mesh(s.shape[0], mesh, expert_axis)
      sharding = layout.leaf_sharding(p, s.shape, mesh, expert_axis)
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
