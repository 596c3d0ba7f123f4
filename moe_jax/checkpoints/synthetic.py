"""Random parameter trees for tests and benchmarks (host numpy, no jax compilation).

  params = random_tree(key_map.param_shapes(), draw, seed=0)    # f32 numpy tree

A family supplies `draw(rng, path, shape)`, which picks the distribution by leaf (e.g. norm scales
near 1, Dense kernels ~ N(0, 1/fan_in)); leaves are drawn in the tree's flattening order from one
seeded generator, so the same seed gives the same tree (see `moe_jax.models.switch.random_params`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from moe_jax.checkpoints import layout

Draw = Callable[[np.random.Generator, layout.TreePath, tuple[int, ...]], np.ndarray]


def random_tree(shapes, draw: Draw, *, seed: int = 0, dtype=np.float32) -> Any:
  """A random tree shaped like `shapes`.

  Args:
    shapes: a tree of leaves with `.shape` (e.g. `jax.ShapeDtypeStruct`s from
      `KeyMap.param_shapes()`).
    draw: (rng, tree path, shape) -> <f32>[shape], called once per leaf in flattening order.
    seed: numpy seed.
    dtype: dtype of the leaves (drawn in f32, then cast, e.g. to jnp.bfloat16).

  Returns:
    The same structure with numpy array leaves.
  """
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: draw(rng, layout.tree_path(p), tuple(s.shape)).astype(dtype, copy=False),
      shapes)
