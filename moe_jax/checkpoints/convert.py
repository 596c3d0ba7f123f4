"""One-off conversions behind `launch/convert_hf.py`.

  to_safetensors("switch-base-128", "switch-base-128-st")   # pytorch_model*.bin -> safetensors
  to_orbax("switch-base-8", "/ckpt/switch8")                 # .bin or safetensors -> orbax params
"""

from __future__ import annotations

import glob
import os

import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints import hf_switch
from moe_jax.checkpoints import orbax_io
from moe_jax.checkpoints import torch_bin


def is_bin_checkpoint(src: str) -> bool:
  """True for a pytorch_model*.bin file / index, or a directory with .bin weights only."""
  if os.path.isfile(src):
    return src.endswith(".bin") or src.endswith(".bin.index.json")
  has_safetensors = (os.path.exists(os.path.join(src, hf_switch.WEIGHTS_NAME))
                     or os.path.exists(os.path.join(src, hf_switch.INDEX_NAME)))
  return not has_safetensors and bool(glob.glob(os.path.join(src, "pytorch_model*.bin")))


def to_safetensors(src: str, dst: str) -> list[str]:
  """pytorch_model*.bin (single or sharded) -> safetensors with the same keys (needs torch)."""
  if not os.path.exists(src):
    raise FileNotFoundError(f"--src {src!r} does not exist.")
  if not (is_bin_checkpoint(src) or glob.glob(os.path.join(src, "pytorch_model*.bin"))):
    raise ValueError(f"{src!r} holds no pytorch_model*.bin weights to convert (safetensors "
                     "checkpoints load directly with hf_switch.load_params).")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError("--dst must differ from --src.")
  return torch_bin.bin_to_safetensors(src, dst)


def to_orbax(src: str, dst: str, *, dtype=jnp.float32, force: bool = False) -> str:
  """A Hugging Face Switch checkpoint (.bin or safetensors) -> orbax params + SwitchConfig.

  The tree is assembled as jax.Arrays on the default device (one model in memory) and handed to
  orbax, which writes jax.Arrays without copying them all first (numpy leaves it would copy).
  """
  if is_bin_checkpoint(src):
    directory = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    source = torch_bin.BinSource.open(src)
  else:
    directory, source = hf_switch.open_safetensors(src)
  config = hf_switch.load_config(directory)
  params = hf_switch.assemble_params(source, config, dtype=dtype,
                                     place=hf_switch.device_placer())
  return orbax_io.save_params(
      dst, params, config=config, force=force,
      metadata={"source": os.path.abspath(src), "dtype": np.dtype(dtype).name})
