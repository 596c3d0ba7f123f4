"""One-off conversions behind `launch/convert_hf.py`.

  to_safetensors("switch-base-128", "switch-base-128-st")   # pytorch_model*.bin -> safetensors
  to_orbax("switch-base-8", "/ckpt/switch8", key_map, config_json=cfg.to_hf_dict(),
           family="switch")                                  # .bin or safetensors -> orbax params

`to_safetensors` keeps the keys and needs no model. `to_orbax` builds the parameter tree, so it
takes the family's key map; the caller resolves the family (`moe_jax.models`). A conversion that
fails (or is interrupted) removes what it created under `dst` (`removed_on_failure`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil

import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints import hf_io
from moe_jax.checkpoints import layout
from moe_jax.checkpoints import orbax_io
from moe_jax.checkpoints import torch_bin


def is_bin_checkpoint(src: str) -> bool:
  """True for a pytorch_model*.bin file / index, or a directory with .bin weights only."""
  if os.path.isfile(src):
    return src.endswith(".bin") or src.endswith(".bin.index.json")
  has_safetensors = (os.path.exists(os.path.join(src, hf_io.WEIGHTS_NAME))
                     or os.path.exists(os.path.join(src, hf_io.INDEX_NAME)))
  return not has_safetensors and bool(glob.glob(os.path.join(src, "pytorch_model*.bin")))


def checkpoint_dir(src: str) -> str:
  """The directory of a checkpoint given as a directory or as one of its files."""
  return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


@contextlib.contextmanager
def removed_on_failure(dst: str):
  """If the block raises (or is interrupted), deletes what it created: `dst` itself if it did not
  exist before, else the entries of `dst` that are new (files it overwrote stay overwritten)."""
  existed = os.path.exists(dst)
  before = set(os.listdir(dst)) if existed and os.path.isdir(dst) else set()
  try:
    yield
  except BaseException:
    if not existed:
      shutil.rmtree(dst, ignore_errors=True)
    elif os.path.isdir(dst):
      for name in set(os.listdir(dst)) - before:
        path = os.path.join(dst, name)
        if os.path.isdir(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)
    raise


def to_safetensors(src: str, dst: str) -> list[str]:
  """pytorch_model*.bin (single or sharded) -> safetensors with the same keys (needs torch)."""
  if not os.path.exists(src):
    raise FileNotFoundError(f"--src {src!r} does not exist.")
  if not (is_bin_checkpoint(src) or glob.glob(os.path.join(src, "pytorch_model*.bin"))):
    raise ValueError(f"{src!r} holds no pytorch_model*.bin weights to convert (safetensors "
                     "checkpoints load directly with moe_jax.models.from_pretrained).")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError("--dst must differ from --src.")
  with removed_on_failure(dst):
    return torch_bin.bin_to_safetensors(src, dst)


def to_orbax(src: str, dst: str, key_map: layout.KeyMap, *, config_json: dict | None = None,
             family: str | None = None, dtype=jnp.float32, force: bool = False) -> str:
  """A Hugging Face checkpoint (.bin or safetensors) -> orbax params + manifest.

  The tree is assembled as jax.Arrays on the default device (one model in memory) and handed to
  orbax, which writes jax.Arrays without copying them all first (numpy leaves it would copy).

  Args:
    src: the checkpoint directory, or one of its weight files / indexes.
    dst: the orbax directory to write.
    key_map: the family's table for the model in `src`.
    config_json, family: stored in the manifest (see `orbax_io.save_params`).
    dtype: dtype of the stored params.
    force: replace an existing checkpoint at `dst`.
  """
  if is_bin_checkpoint(src):
    source = torch_bin.BinSource.open(src)
  else:
    _, source = hf_io.open_safetensors(src)
  params = hf_io.assemble_params(source, key_map, dtype=dtype, place=hf_io.device_placer())
  with removed_on_failure(dst):
    return orbax_io.save_params(
        dst, params, config_json=config_json, family=family, key_map=key_map, force=force,
        metadata={"source": os.path.abspath(src), "dtype": np.dtype(dtype).name})
