"""From a launch config tree (moe_jax/presets.py) to typed objects: mesh, model, MoE and
replication configs, tokenizer, learned predictor. Launch scripts call these and nothing deeper.

Errors here are `UsageError`s: one line that names the fix, printed by the launch scripts without
a traceback.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from moe_jax import mesh as mesh_lib
from moe_jax import presets
from moe_jax.config import MoEConfig
from moe_jax.models import switch
from moe_jax.models.switch_config import SwitchConfig
from moe_jax.replication import ReplicationConfig


class UsageError(ValueError):
  """A problem with the user's config or flags; the message says how to fix it."""


def make_mesh(mesh_cfg) -> jax.sharding.Mesh:
  """The ('data', 'expert') mesh of config.mesh (expert=-1: all devices / data).

  In a multi-process job the mesh spans every process's devices (`distributed.make_global_mesh`)
  and must use all of them.
  """
  from moe_jax import distributed  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  data = int(mesh_cfg.data)
  expert = int(mesh_cfg.expert)
  if expert == -1:
    expert = len(devices) // max(data, 1)
  if data < 1 or expert < 1 or data * expert > len(devices):
    raise UsageError(
        f"mesh data={mesh_cfg.data} x expert={mesh_cfg.expert} does not fit the {len(devices)} "
        f"visible {jax.default_backend()} device(s); set --config.mesh.data/--config.mesh.expert "
        "so data * expert <= devices (on CPU, --config.cpu_devices=N simulates N devices).")
  if jax.process_count() > 1:
    try:
      return distributed.make_global_mesh(data, expert)
    except ValueError as e:
      raise UsageError(f"{e} (--config.mesh.data / --config.mesh.expert)") from None
  return mesh_lib.make_mesh(data, expert)


def switch_config(config) -> SwitchConfig:
  try:
    return switch.config_from_dict(config.model)
  except (TypeError, ValueError) as e:
    raise UsageError(f"config.model: {e}") from None


def moe_config(config, model_cfg: SwitchConfig, dtype=jnp.float32) -> MoEConfig:
  try:
    return switch.moe_config_for(model_cfg, dtype, dict(config.moe))
  except (TypeError, ValueError) as e:
    raise UsageError(f"config.moe: {e}") from None


def replication_config(config) -> ReplicationConfig:
  try:
    return ReplicationConfig(**dict(config.replication))
  except (TypeError, ValueError) as e:
    raise UsageError(f"config.replication: {e}") from None


def checkpoint_dir(path: str) -> str:
  resolved = presets.resolve_checkpoint(path)
  if not path:
    raise UsageError("no checkpoint given: set --config.checkpoint=/path/to/dir (a Hugging Face "
                     "download or a moe_jax orbax dir), or use configs/switch_tiny.py.")
  if not os.path.isdir(resolved):
    hint = (" (the builtin model is created by launch/train.py)" if path.startswith(presets.BUILTIN)
            else "")
    raise UsageError(f"checkpoint {path!r} is not a directory{hint}; check --config.checkpoint.")
  return resolved


def load_model(config, *, mesh=None, dtype=jnp.float32):
  """(SwitchConfig, params, tokenizer or None) from config.checkpoint.

  A moe_jax orbax dir (moe_jax.json + params/) or a Hugging Face dir (config.json + safetensors).
  The model fields stored with the checkpoint win over config.model.
  """
  from moe_jax.checkpoints import hf_switch, orbax_io  # pylint: disable=import-outside-toplevel
  path = checkpoint_dir(config.checkpoint)
  if os.path.exists(os.path.join(path, orbax_io.MANIFEST_NAME)):
    model_cfg = orbax_io.load_config(path) or switch_config(config)
    params = orbax_io.restore_params(path, mesh=mesh)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  elif os.path.exists(os.path.join(path, "config.json")):
    model_cfg = SwitchConfig.from_hf_dir(path)
    params = hf_switch.load_params(path, model_cfg, dtype=dtype, mesh=mesh)
  else:
    raise UsageError(f"{path!r} holds neither moe_jax.json (orbax) nor config.json (Hugging Face);"
                     " point --config.checkpoint at a checkpoint directory.")
  return model_cfg, params, switch.load_tokenizer(path)


def sparse_layers(params: dict, model_cfg: SwitchConfig) -> dict:
  """The stack-runner view of a Switch model: stack -> its sparse FFN params in block order."""
  return {stack: [params[stack]["blocks"][i]["ff"] for i in model_cfg.sparse_blocks(stack)]
          for stack in ("encoder", "decoder")}


def load_learned_predictor(config, model_cfg: SwitchConfig):
  """The learned predictor of config.predictor_checkpoint, or None if unset/absent."""
  from moe_jax import predictor_training  # pylint: disable=import-outside-toplevel
  path = presets.resolve_checkpoint(config.predictor_checkpoint)
  if not config.predictor_checkpoint or not os.path.isdir(path):
    return None
  counts = {stack: len(model_cfg.sparse_blocks(stack)) for stack in ("encoder", "decoder")}
  template = predictor_training.learned_template(counts, model_cfg.d_model, model_cfg.num_experts,
                                                 rank=_rank(config))
  return predictor_training.restore_learned(path, template=template)


def _rank(config):
  rank = int(config.train.predictor_rank)
  return rank if rank > 0 else None


def as_dict(obj) -> dict:
  return dataclasses.asdict(obj)
