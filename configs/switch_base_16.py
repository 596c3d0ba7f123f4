"""google/switch-base-16: the released Switch Transformer base with 16 experts per sparse block.

  python launch/infer.py --config=configs/switch_base_16.py --config.checkpoint=/path/to/switch-base-16

`model` holds the SwitchConfig fields of the released checkpoint (its config.json); the full tree
is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.switch_base(16)
