"""Model families built on the moe_jax MoE layer, and the registry that finds them.

  from moe_jax import models
  model = models.from_pretrained("path/to/checkpoint", mesh=mesh)   # HF dir or moe_jax orbax dir
  family, config, params = models.load_checkpoint("path/to/checkpoint")
  family, config = models.checkpoint_config("path/to/checkpoint")   # no weights read
  family = models.get_family("switch")                             # the family's module
  family = models.family_for_model_type("switch_transformers")     # from config.json's model_type

A family is a subpackage exposing the same few names (`NAME`, `MODEL_TYPES`, `Config`, `Model`,
`from_pretrained`, `hf_key_map`, `moe_config`, `moe_layers`, ...; see `moe_jax.models.switch`).
Families are imported lazily by name, so no shared module imports one by hand. `moe_stack` (the
minimal stack for tests and examples) is not a family.
"""

from __future__ import annotations

import importlib
import os
import types

import jax
import jax.numpy as jnp

# family name -> module
FAMILIES = {
    "switch": "moe_jax.models.switch",
    "qwen3_moe": "moe_jax.models.qwen3_moe",
    "mixtral": "moe_jax.models.mixtral",
    "olmoe": "moe_jax.models.olmoe",
    "qwen2_moe": "moe_jax.models.qwen2_moe",
    "deepseek_v3": "moe_jax.models.deepseek_v3",
    "glm4_moe": "moe_jax.models.glm4_moe",
}

_ORBAX_MANIFEST = "moe_jax.json"   # `moe_jax.checkpoints.orbax_io.MANIFEST_NAME`
_HF_CONFIG = "config.json"


def get_family(name: str) -> types.ModuleType:
  """The family module registered as `name` (ValueError listing the supported names)."""
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; supported: {sorted(FAMILIES)}.")
  return importlib.import_module(FAMILIES[name])


def family_for_model_type(model_type: str | None) -> types.ModuleType:
  """The family that reads config.json's `model_type` (ValueError listing the supported ones)."""
  supported = []
  for name in FAMILIES:
    family = get_family(name)
    if model_type in family.MODEL_TYPES:
      return family
    supported.extend(family.MODEL_TYPES)
  raise ValueError(f"model_type {model_type!r} has no moe_jax model family; supported: "
                   f"{sorted(supported)}.")


def checkpoint_family(path: str) -> types.ModuleType:
  """The family of a checkpoint directory: a moe_jax orbax dir (its manifest's family, else its
  stored config's model_type) or a Hugging Face dir (config.json's model_type)."""
  from moe_jax.checkpoints import hf_io  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, _ORBAX_MANIFEST)):
    from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
    name = orbax_io.load_family(path)
    if name is not None:
      return get_family(name)
    config_json = orbax_io.load_config(path)
    if config_json is None:
      raise ValueError(f"{path!r} stores neither a model family nor a config; it holds params "
                       "only (e.g. a learned predictor), not a model.")
    return family_for_model_type(config_json.get("model_type"))
  if os.path.exists(os.path.join(path, _HF_CONFIG)):
    return family_for_model_type(hf_io.read_config(path).get("model_type"))
  raise FileNotFoundError(f"{path!r} holds neither {_ORBAX_MANIFEST} (moe_jax orbax) nor "
                          f"{_HF_CONFIG} (Hugging Face); point at a checkpoint directory.")


def hf_config(directory: str):
  """(family module, its Config) of a Hugging Face checkpoint directory, from its config.json."""
  from moe_jax.checkpoints import hf_io  # pylint: disable=import-outside-toplevel
  family = family_for_model_type(hf_io.read_config(directory).get("model_type"))
  return family, family.Config.from_hf_dir(directory)


def checkpoint_config(path: str):
  """(family module, its Config) of a moe_jax orbax or Hugging Face checkpoint directory, read
  from its manifest / config.json only (no weights)."""
  family = checkpoint_family(path)
  if not os.path.exists(os.path.join(path, _ORBAX_MANIFEST)):
    return family, family.Config.from_hf_dir(path)
  from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
  config_json = orbax_io.load_config(path)
  if config_json is None:
    raise ValueError(f"{path!r} was saved without its config; re-save it with "
                     "orbax_io.save_params(..., config_json=config.to_hf_dict()).")
  return family, family.Config.from_hf_dict(config_json)


def load_params(path: str, family: types.ModuleType, config, *, mesh=None, dtype=jnp.float32):
  """The params of a checkpoint directory whose family and Config are known (`checkpoint_config`).

  With a mesh, expert stacks are sharded over its expert axis and every other leaf replicated.
  """
  if not os.path.exists(os.path.join(path, _ORBAX_MANIFEST)):
    from moe_jax.checkpoints import hf_io  # pylint: disable=import-outside-toplevel
    return hf_io.load_params(path, family.hf_key_map(config), dtype=dtype, mesh=mesh)
  from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
  from moe_jax.checkpoints import layout  # pylint: disable=import-outside-toplevel
  params = orbax_io.restore_params(path, mesh=mesh)
  keep = family.hf_key_map(config).float32_paths()   # as the HF import: e.g. sigmoid routers
  return layout.build_tree({where: leaf.astype(jnp.float32 if where in keep else dtype)
                            for where, leaf in layout.flatten(params).items()})


def load_checkpoint(path: str, *, mesh=None, dtype=jnp.float32):
  """(family module, its Config, params) of a moe_jax orbax or Hugging Face checkpoint directory.

  With a mesh, expert stacks are sharded over its expert axis and every other leaf replicated.
  """
  family, config = checkpoint_config(path)
  return family, config, load_params(path, family, config, mesh=mesh, dtype=dtype)


def from_pretrained(path: str, mesh=None, dtype=jnp.float32, execution=None):
  """The family's `Model` from a checkpoint directory (see `load_checkpoint`).

  Args:
    path: a Hugging Face directory (config.json + safetensors; its `model_type` picks the family)
      or a moe_jax orbax directory (moe_jax.json + params/; its manifest names the family).
    mesh: a ('data', 'expert') mesh, or None for one device.
    dtype: dtype of the params.
    execution: a `moe_jax.config.ExecutionConfig` (None: the default, dropless).
  """
  family, config, params = load_checkpoint(path, mesh=mesh, dtype=dtype)
  return family.Model(config, params, mesh=mesh, execution=execution)
