"""Decoder building blocks shared by the decoder-only families, as pure functions over arrays.

Semantics follow transformers' Llama-style decoders (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE,
GLM-4-MoE; DeepSeek's attention is in `attention.py`):
  * RMSNorm `w * x * rsqrt(mean(x**2) + eps)` in float32, with the family's `rms_norm_eps`;
  * rotary embeddings over the first `rw = cfg.rotary_width` dims of a head (the whole head but
    for GLM's partial rotary; the rest pass through), rotate_half pairing (i, i + rw/2),
    frequencies `1 / theta**(arange(0, rw, 2) / rw)`; DeepSeek's interleaved pairs (2i, 2i+1)
    are de-interleaved first ([evens | odds], as HF returns them: the same dot products);
  * grouped-query attention: query head h reads kv head h // (H / Hkv); scores scaled by the
    q/k head width ** -0.5;
  * optional q/k/v projection biases (Qwen2-MoE, GLM); optional q/k RMSNorm: per head over hd
    after the head split (Qwen3, GLM), or over the whole projection before it (OLMoE, then
    `clip_qkv` clamps q, k and v);
  * additive masks: 0 where a key may be attended, finfo(dtype).min where not;
  * dense SwiGLU MLP `wo(silu(x wi_gate) * (x wi))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.models.common import rms_norm
from moe_jax.models.decoder.config import DecoderConfig


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """(cos, sin) <f32>[B, L, hd] of rotary embeddings over hd dims at <int>[B, L] positions."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions[..., None].astype(jnp.float32) * inv_freq                 # [B, L, hd/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)                           # [B, L, hd]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *,
               interleaved: bool = False) -> jax.Array:
  """<f>[B, L, n, hd] with its first rw dims rotated by (cos, sin) <f32>[B, L, rw].

  rotate_half pairs (i, i + rw/2); `interleaved` pairs (2i, 2i+1), returned de-interleaved
  ([rotated evens | rotated odds], HF's layout for DeepSeek)."""
  width = cos.shape[-1]
  x_rot, x_pass = x[..., :width], x[..., width:]
  if interleaved:
    x_rot = jnp.concatenate([x_rot[..., 0::2], x_rot[..., 1::2]], axis=-1)
  half = width // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


def additive_mask(allowed: jax.Array, dtype) -> jax.Array:
  """<bool>[...] -> <dtype>[...]: 0 where allowed, finfo(dtype).min where not."""
  return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def attend(query: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array) -> jax.Array:
  """Grouped-query attention.

  Args:
    query: <f>[B, L, H, hd].
    keys: <f>[B, S, Hkv, hd]; H is a multiple of Hkv.
    values: <f>[B, S, Hkv, vd].
    bias: <f>[B, L, S] additive mask (causal and key padding).

  Returns:
    <f>[B, L, H * vd].
  """
  batch, length, heads, head_dim = query.shape
  kv_heads = keys.shape[2]
  query = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("blkgd,bskd->bkgls", query, keys) * head_dim ** -0.5   # [B, Hkv, G, L, S]
  scores = scores + bias[:, None, None]
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(values.dtype)
  out = jnp.einsum("bkgls,bskd->blkgd", weights, values)
  return out.reshape(batch, length, heads * values.shape[-1])


def project_qkv(attn: dict, x: jax.Array, cfg: DecoderConfig):
  """(q <f>[B, L, H, hd], k, v <f>[B, L, Hkv, hd]) before rotary embeddings, with the family's
  q/k norm and clipping."""
  batch, length, _ = x.shape
  hd = cfg.head_width
  q, k, v = (jnp.dot(x, attn[name]) for name in ("q", "k", "v"))
  if cfg.qkv_bias:
    q, k, v = q + attn["q_bias"], k + attn["k_bias"], v + attn["v_bias"]
  if cfg.qk_norm == "full":                                      # OLMoE: over the projection
    q = rms_norm(q, attn["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, attn["k_norm"], cfg.rms_norm_eps)
  if cfg.clip_qkv is not None:
    q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
  q = q.reshape(batch, length, -1, hd)
  k = k.reshape(batch, length, -1, hd)
  v = v.reshape(batch, length, -1, hd)
  if cfg.qk_norm == "per_head":                                  # Qwen3, GLM: over each head
    q = rms_norm(q, attn["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, attn["k_norm"], cfg.rms_norm_eps)
  return q.astype(x.dtype), k.astype(x.dtype), v


def swiglu(mlp: dict, x: jax.Array) -> jax.Array:
  """Dense SwiGLU MLP: {"wi_gate", "wi": <f>[d, I], "wo": <f>[I, d]}, <f>[..., d] -> <f>[..., d]."""
  hidden = jax.nn.silu(jnp.dot(x, mlp["wi_gate"])) * jnp.dot(x, mlp["wi"])
  return jnp.dot(hidden.astype(mlp["wo"].dtype), mlp["wo"])
