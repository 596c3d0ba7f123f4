"""Checkpoint import/export for any model family: Hugging Face safetensors, orbax, torch .bin.

  from moe_jax.checkpoints import hf_io, orbax_io
  key_map = family.hf_key_map(config)                 # a family of `moe_jax.models`
  params = hf_io.load_params("ckpt-dir", key_map, mesh=moe_jax.make_mesh(data=2, expert=4))
  orbax_io.save_params("/ckpt/copy", params, expert_paths=key_map.expert_paths())

Nothing here knows a model: a family describes its checkpoint layout with a `layout.KeyMap` (HF key
-> tree leaf, which leaves are expert stacks) and these modules read and write by it. Modules:
`layout` (KeyMap, TensorSpec, tree paths, shardings, CheckpointError), `hf_io` (safetensors
import/export by key map), `safetensors_io` (finding a checkpoint's files, tensor-at-a-time file
IO), `orbax_io` (orbax save/restore with a manifest), `torch_bin` (pytorch_model*.bin via torch,
weights_only), `convert` (what launch/convert_hf.py runs), `synthetic` (random trees for tests and
benchmarks). `orbax_io` is not imported here, so importing this package stays cheap. A file that
cannot be used raises `CheckpointError` (a ValueError) naming it.
"""

from moe_jax.checkpoints.hf_io import load_params, read_config, save_hf_safetensors
from moe_jax.checkpoints.layout import CheckpointError, KeyMap, TensorSpec

__all__ = ["CheckpointError", "KeyMap", "TensorSpec", "load_params", "read_config",
           "save_hf_safetensors"]
