"""The small Switch model trained on pydoc text, shipped in moe_jax/assets/switch_tiny.

  python launch/train.py --config=configs/switch_tiny.py           # how it was made
  python launch/bench.py --config=configs/switch_tiny.py

Tree described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.switch_tiny()
