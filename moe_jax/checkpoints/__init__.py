"""Checkpoint import/export: Hugging Face safetensors, orbax.

  from moe_jax.checkpoints import hf_switch, orbax_io
  params = hf_switch.load_params("switch-base-8", mesh=moe_jax.make_mesh(data=2, expert=4))
  orbax_io.save_params("/ckpt/switch8", params)

Modules: `layout` (HF key <-> tree path table, shardings), `hf_switch` (safetensors import/export),
`safetensors_io` (tensor-at-a-time file IO), `orbax_io` (orbax save/restore), `torch_bin`
(pytorch_model*.bin via torch, weights_only), `convert` (what launch/convert_hf.py runs),
`synthetic` (random parameters for tests and benchmarks). `orbax_io` is not imported here, so
importing this package stays cheap.
"""

from moe_jax.checkpoints.hf_switch import load_config, load_params, save_hf_safetensors
from moe_jax.checkpoints.layout import param_shapes
from moe_jax.checkpoints.synthetic import random_params

__all__ = ["load_config", "load_params", "param_shapes", "random_params", "save_hf_safetensors"]
