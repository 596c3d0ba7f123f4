"""Layers every model family shares (written once, imported by the families)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HALF_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def rms_norm(x: jax.Array, weight: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
  """RMS norm as T5 / Switch compute it: `weight * x / sqrt(mean(x**2) + eps)`, in float32.

  Args:
    x: <f>[..., d].
    weight: <f>[d] scale, or None for none.
    eps: added to the mean square.

  Returns:
    <f>[..., d]: in `weight`'s dtype if it is a half type (as Hugging Face casts), else float32
    (x's dtype when there is no weight).
  """
  x32 = x.astype(jnp.float32)
  variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  normed = x32 * jax.lax.rsqrt(variance + eps)
  if weight is None:
    return normed.astype(x.dtype)
  if weight.dtype in _HALF_DTYPES:
    normed = normed.astype(weight.dtype)
  return weight * normed
