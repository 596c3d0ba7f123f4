"""Random Switch parameters for tests and benchmarks (host numpy, no jax compilation).

  params = random_params(SwitchConfig(...), seed=0)            # f32 numpy tree
  save_hf_safetensors(params, config, "/tmp/ckpt", max_shard_bytes=1 << 20)

Values are drawn so a forward pass stays in a sane range: Dense kernels ~ N(0, 1/fan_in),
embeddings ~ N(0, 1), norm scales 1 + N(0, 0.1), relative attention biases ~ N(0, 0.1). Every leaf
differs, so a transposed or misplaced tensor is caught by an exact comparison.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from moe_jax.checkpoints import layout
from moe_jax.models.switch_config import SwitchConfig


def _draw(rng: np.random.Generator, path: layout.TreePath, shape: tuple[int, ...]) -> np.ndarray:
  """<f32>[shape] for the leaf at `path`."""
  name = path[-1]
  x = rng.standard_normal(shape, dtype=np.float32)
  if name in ("attn_norm", "cross_norm", "ff_norm", "final_norm"):
    return 1.0 + 0.1 * x
  if name == "relative_attention_bias":
    return 0.1 * x
  if name in ("shared", "encoder_embed", "decoder_embed"):
    return x
  fan_in = shape[-2]  # Dense kernels are [in, out] (expert stacks [E, in, out])
  x *= np.float32(fan_in ** -0.5)
  return x


def random_params(config: SwitchConfig, seed: int = 0, *, dtype=np.float32) -> dict[str, Any]:
  """A random parameter tree of `config` (the layout of `moe_jax.models.switch_config`).

  Args:
    config: the model.
    seed: numpy seed; the same seed gives the same tree.
    dtype: dtype of the leaves (drawn in f32, then cast, e.g. to jnp.bfloat16).

  Returns:
    Nested dicts/lists of numpy arrays.
  """
  rng = np.random.default_rng(seed)
  shapes = layout.param_shapes(config)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: _draw(rng, layout.tree_path(p), s.shape).astype(dtype, copy=False), shapes)
