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
from moe_jax.checkpoints.layout import CheckpointError


def make_mesh(mesh_cfg: MeshConfig) -> jax.sharding.Mesh:
  """The ('data', 'expert') mesh of config.mesh (expert=-1: all devices / data).

  It must use every visible device unless `mesh_cfg.allow_idle_devices`. In a multi-process job
  the mesh spans every process's devices (`distributed.make_global_mesh`) and must use all of
  them.
  """
  devices = jax.devices()
  data, expert = int(mesh_cfg.data), int(mesh_cfg.expert)
  if expert == -1:
    expert = len(devices) // max(data, 1)
  cpu_hint = (" (on CPU, --config.cpu_devices=N simulates N devices)"
              if jax.default_backend() == "cpu" else "")
  if data < 1 or expert < 1 or data * expert > len(devices):
    raise UsageError(
        f"mesh data={mesh_cfg.data} x expert={mesh_cfg.expert} does not fit the {len(devices)} "
        f"visible {jax.default_backend()} device(s); set --config.mesh.data/--config.mesh.expert "
        f"so data * expert <= devices{cpu_hint}.")
  if data * expert < len(devices) and not (mesh_cfg.allow_idle_devices
                                           and jax.process_count() == 1):
    raise UsageError(
        f"mesh data={data} x expert={expert} uses {data * expert} of the {len(devices)} visible "
        f"{jax.default_backend()} devices and would leave {len(devices) - data * expert} idle; "
        f"set --config.mesh.data/--config.mesh.expert so data * expert = {len(devices)}"
        f"{cpu_hint}, or pass --config.mesh.allow_idle_devices=True to run on "
        f"{data * expert} anyway.")
  if jax.process_count() > 1:
    try:
      return distributed.make_global_mesh(data, expert)
    except ValueError as e:
      raise UsageError(f"{e} (--config.mesh.data / --config.mesh.expert)") from None
  return mesh_lib.make_mesh(data, expert)


def check_experts_fit(num_experts: int, mesh: jax.sharding.Mesh, mesh_cfg: MeshConfig) -> None:
  """UsageError naming the flags when the mesh's expert axis does not divide `num_experts`."""
  data, expert = mesh.shape["data"], mesh.shape["expert"]
  if num_experts % expert == 0:
    return
  devices = len(jax.devices())
  divisors = [k for k in range(1, num_experts + 1) if num_experts % k == 0]
  given = "-1 (all devices / data)" if int(mesh_cfg.expert) == -1 else str(mesh_cfg.expert)
  fix = [f"--config.mesh.data={devices // k} --config.mesh.expert={k}" for k in divisors
         if devices % k == 0][-1]          # always found: k = 1
  cpu_hint = ""
  if jax.default_backend() == "cpu":
    simulated = max(k for k in divisors if k <= max(devices, 8))
    cpu_hint = (f", or simulate a device count the experts split over, e.g. "
                f"--config.cpu_devices={simulated}")
  raise UsageError(
      f"the model's {num_experts} experts do not split over the mesh's expert axis of {expert} "
      f"devices (--config.mesh.expert={given}, --config.mesh.data={data}, {devices} devices); "
      f"choose an expert axis that divides {num_experts} and uses every device, e.g. {fix}"
      f"{cpu_hint}.")


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


def checkpoint_config(job: Job):
  """(family module, its Config) of config.checkpoint, from its config only (no weights).

  UsageError when the checkpoint holds another family than --config.model.family, so a launch
  script finds out before it reads a prompt or any weight with the wrong family.
  """
  path = checkpoint_dir(job)
  try:
    family, config = models.checkpoint_config(path)
  except (FileNotFoundError, ValueError) as e:   # absent, corrupt or unsupported config
    raise _checkpoint_error(e, job) from None
  if family is not job.family:
    raise UsageError(f"checkpoint {job.checkpoint!r} holds a {family.NAME!r} model but "
                     f"--config.model.family={job.family.NAME!r}; pass a --config of that family "
                     f"(configs/{family.NAME}_*.py) or another --config.checkpoint.")
  return family, config


def load_tokenizer(job: Job):
  """The SentencePiece tokenizer stored with config.checkpoint, or None if it has none."""
  return data_lib.load_tokenizer(checkpoint_dir(job))


def load_model(job: Job, *, mesh=None, dtype=jnp.float32):
  """(the family's Model bound to job.execution, tokenizer or None) from config.checkpoint.

  A moe_jax orbax dir (moe_jax.json + params/) or a Hugging Face dir (config.json + safetensors);
  the model config stored with the checkpoint wins over config.model. A checkpoint that cannot
  be used (missing, corrupt or refused files; tensors that do not match its config; experts that
  do not split over the mesh) is a UsageError naming the file or the flag.
  """
  path = checkpoint_dir(job)
  family, config = checkpoint_config(job)    # checks the family
  if mesh is not None:
    check_experts_fit(family.moe_config(config, dtype).num_experts, mesh, job.mesh)
  try:
    params = models.load_params(path, family, config, mesh=mesh, dtype=dtype)
  except (FileNotFoundError, CheckpointError) as e:
    raise _checkpoint_error(e, job) from None
  model = family.Model(config, params, mesh=mesh, execution=job.execution)
  return model, data_lib.load_tokenizer(path)


def _checkpoint_error(error: Exception, job: Job) -> UsageError:
  """`error` naming the flag at the end of its first line (a mismatch lists tensors below it)."""
  first, newline, rest = str(error).partition("\n")
  return UsageError(f"{first} (--config.checkpoint={job.checkpoint}){newline}{rest}")


def load_learned_predictor(job: Job, layer_counts: dict, d_model: int, num_experts: int):
  """The learned predictor of config.predictor_checkpoint (per-token maps and load heads), or
  None if unset/absent; a checkpoint of other shapes (another model, another rank, or one from
  before load heads) is a UsageError naming the fix."""
  path = job.predictor_path
  if not job.predictor_checkpoint or not os.path.isdir(path):
    return None
  template = predictor_training.learned_template(layer_counts, d_model, num_experts,
                                                 rank=job.predictor_rank)
  try:
    return predictor_training.restore_learned(path, template=template)
  except ValueError as e:
    first, newline, rest = str(e).partition("\n")
    raise UsageError(f"{first} (--config.predictor_checkpoint={job.predictor_checkpoint}, "
                     f"--config.train.predictor_rank={job.train.predictor_rank}); retrain it with "
                     f"python launch/train_predictor.py --force{newline}{rest}") from None


def on_mesh(tree, mesh):
  """A host tree copied onto `mesh` (each process its devices' part; see distributed.from_host)."""
  return distributed.from_host(jax.tree.map(np.asarray, tree), mesh)
