"""What launch scripts build from a typed `Job`: the mesh, the model, the learned predictor.

Errors here are `UsageError`s: one line that names the fix (and the `--config.*` flag), printed
by the launch scripts without a traceback.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import distributed
from moe_jax import mesh as mesh_lib
from moe_jax import models
from moe_jax.app import data as data_lib
from moe_jax.app import predictor_training
from moe_jax.app import presets
from moe_jax.app.config import Job, MeshConfig, UsageError


def make_mesh(mesh_cfg: MeshConfig) -> jax.sharding.Mesh:
  """The ('data', 'expert') mesh of config.mesh (expert=-1: all devices / data).

  In a multi-process job the mesh spans every process's devices (`distributed.make_global_mesh`)
  and must use all of them.
  """
  devices = jax.devices()
  data, expert = int(mesh_cfg.data), int(mesh_cfg.expert)
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


def checkpoint_dir(job: Job) -> str:
  """config.checkpoint resolved and checked to be a directory."""
  if not job.checkpoint:
    raise UsageError("no checkpoint given: set --config.checkpoint=/path/to/dir (a Hugging Face "
                     "download or a moe_jax orbax dir), or use configs/switch_tiny.py.")
  resolved = job.checkpoint_path
  if not os.path.isdir(resolved):
    hint = (" (the builtin model is created by launch/train.py)"
            if job.checkpoint.startswith(presets.BUILTIN) else "")
    raise UsageError(f"checkpoint {job.checkpoint!r} is not a directory{hint}; check "
                     "--config.checkpoint.")
  return resolved


def load_model(job: Job, *, mesh=None, dtype=jnp.float32):
  """(the family's Model bound to job.execution, tokenizer or None) from config.checkpoint.

  A moe_jax orbax dir (moe_jax.json + params/) or a Hugging Face dir (config.json + safetensors);
  the model config stored with the checkpoint wins over config.model.
  """
  path = checkpoint_dir(job)
  try:
    model = models.from_pretrained(path, mesh=mesh, dtype=dtype, execution=job.execution)
  except FileNotFoundError as e:
    raise UsageError(f"{e} (--config.checkpoint)") from None
  if not isinstance(model, job.family.Model):
    raise UsageError(f"checkpoint {job.checkpoint!r} holds a {type(model).__name__} but "
                     f"--config.model.family={job.family.NAME!r}; change one of them.")
  return model, data_lib.load_tokenizer(path)


def load_learned_predictor(job: Job, layer_counts: dict, d_model: int, num_experts: int):
  """The learned predictor of config.predictor_checkpoint, or None if unset/absent."""
  path = job.predictor_path
  if not job.predictor_checkpoint or not os.path.isdir(path):
    return None
  template = predictor_training.learned_template(layer_counts, d_model, num_experts,
                                                 rank=job.predictor_rank)
  return predictor_training.restore_learned(path, template=template)


def on_mesh(tree, mesh):
  """A host tree copied onto `mesh` (each process its devices' part; see distributed.from_host)."""
  return distributed.from_host(jax.tree.map(np.asarray, tree), mesh)
