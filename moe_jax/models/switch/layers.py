"""T5 building blocks used by the Switch encoder and decoder, as pure functions over arrays.

Semantics follow Hugging Face's T5/Switch implementation:
  * RMSNorm without mean subtraction or bias, variance in float32;
  * attention without the 1/sqrt(d_kv) scaling (T5 folds it into the initialisation);
  * a learned bias per (relative-position bucket, head), added to the scores before the softmax;
  * masks are additive: 0 where a key may be attended, finfo(dtype).min where it may not.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.models.common import rms_norm  # noqa: F401  (the T5 layer norm)


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """Mesh-TF bucketing of `memory_position - query_position`.

  Small distances get one bucket each; larger ones share logarithmically wider buckets up to
  `max_distance`, beyond which everything lands in the last bucket. Bidirectional buckets spend half
  the buckets on each side (keys after the query get the upper half); unidirectional ones only see
  keys at or before the query (`n = max(-relative_position, 0)`).

  Args:
    relative_position: <int>[...] key position minus query position.
    bidirectional: True for the encoder, False for the decoder's causal self-attention.
    num_buckets, max_distance: the config's `relative_attention_num_buckets` / `_max_distance`.

  Returns:
    <int32>[...] buckets in [0, num_buckets).
  """
  relative_position = relative_position.astype(jnp.int32)
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # float32 log then truncation toward zero, exactly as HF (the rounding decides boundary buckets).
  log_ratio = jnp.log(distance.astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  if_large = jnp.minimum(if_large, num_buckets - 1)
  return buckets + jnp.where(is_small, distance, if_large)


def position_bias(table: jax.Array, query_positions: jax.Array, key_positions: jax.Array, *,
                  bidirectional: bool, max_distance: int) -> jax.Array:
  """The learned relative-position bias.

  Args:
    table: <f>[num_buckets, H] `relative_attention_bias` of block 0 of the stack.
    query_positions: <int32>[Lq] absolute positions of the queries (past_len + arange(Lq) with a
      cache).
    key_positions: <int32>[Lk].
    bidirectional: encoder True, decoder False.
    max_distance: `relative_attention_max_distance`.

  Returns:
    <f>[1, H, Lq, Lk].
  """
  relative = key_positions[None, :] - query_positions[:, None]                # [Lq, Lk]
  buckets = relative_position_bucket(relative, bidirectional=bidirectional,
                                     num_buckets=table.shape[0], max_distance=max_distance)
  return jnp.transpose(table[buckets], (2, 0, 1))[None]                       # [1, H, Lq, Lk]


def additive_mask(allowed: jax.Array, dtype) -> jax.Array:
  """<bool>[...] -> <dtype>[...]: 0 where allowed, finfo(dtype).min where not (HF's convention)."""
  return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def split_heads(x: jax.Array, kernel: jax.Array, num_heads: int) -> jax.Array:
  """Project and split: <f>[B, L, d] @ <f>[d, H * d_kv] -> <f>[B, H, L, d_kv]."""
  batch, length, _ = x.shape
  y = jnp.dot(x, kernel).reshape(batch, length, num_heads, -1)
  return jnp.transpose(y, (0, 2, 1, 3))


def attend(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array) -> jax.Array:
  """Unscaled dot-product attention.

  Args:
    query: <f>[B, H, Lq, d_kv].
    key, value: <f>[B, H, Lk, d_kv].
    bias: <f>[B or 1, H or 1, Lq, Lk] position bias plus additive mask.

  Returns:
    <f>[B, Lq, H * d_kv] heads merged back.
  """
  scores = jnp.einsum("bhqd,bhkd->bhqk", query, key) + bias                    # no 1/sqrt(d_kv)
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)
  out = jnp.einsum("bhqk,bhkd->bqhd", weights, value)
  return out.reshape(out.shape[0], out.shape[1], -1)


def dense_ffn(ff: dict, x: jax.Array) -> jax.Array:
  """T5 dense ReLU FFN: {"wi": <f>[d, f], "wo": <f>[f, d]}, <f>[..., d] -> <f>[..., d]."""
  hidden = jax.nn.relu(jnp.dot(x, ff["wi"]))
  return jnp.dot(hidden.astype(ff["wo"].dtype), ff["wo"])
