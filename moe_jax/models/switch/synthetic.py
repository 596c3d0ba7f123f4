"""Random Switch parameters for tests and benchmarks (host numpy, no jax compilation).

  params = random_params(SwitchConfig(...), seed=0)            # f32 numpy tree
  hf_io.save_hf_safetensors(params, hf_key_map(config), "/tmp/ckpt",
                            config_json=config.to_hf_dict(), max_shard_bytes=1 << 20)

Values are drawn so a forward pass stays in a sane range: Dense kernels ~ N(0, 1/fan_in),
embeddings ~ N(0, 1), norm scales 1 + N(0, 0.1), relative attention biases ~ N(0, 0.1). Every leaf
differs, so a transposed or misplaced tensor is caught by an exact comparison.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_jax.checkpoints import layout
from moe_jax.checkpoints import synthetic
from moe_jax.models.switch.config import SwitchConfig
from moe_jax.models.switch.keys import hf_key_map

_NORMS = ("attn_norm", "cross_norm", "ff_norm", "final_norm")
_EMBEDDINGS = ("shared", "encoder_embed", "decoder_embed")


def draw(rng: np.random.Generator, path: layout.TreePath, shape: tuple[int, ...]) -> np.ndarray:
  """<f32>[shape] for the leaf at `path` (see the module docstring)."""
  name = path[-1]
  x = rng.standard_normal(shape, dtype=np.float32)
  if name in _NORMS:
    return 1.0 + 0.1 * x
  if name == "relative_attention_bias":
    return 0.1 * x
  if name in _EMBEDDINGS:
    return x
  fan_in = shape[-2]  # Dense kernels are [in, out] (expert stacks [E, in, out])
  x *= np.float32(fan_in ** -0.5)
  return x


def random_params(config: SwitchConfig, seed: int = 0, dtype=np.float32) -> dict[str, Any]:
  """A random parameter tree of `config` (the layout of `config.py`).

  Args:
    config: the model.
    seed: numpy seed; the same seed gives the same tree.
    dtype: dtype of the leaves (drawn in f32, then cast, e.g. to jnp.bfloat16).

  Returns:
    Nested dicts/lists of numpy arrays.
  """
  shapes = hf_key_map(config).param_shapes()
  return synthetic.random_tree(shapes, draw, seed=seed, dtype=dtype)
