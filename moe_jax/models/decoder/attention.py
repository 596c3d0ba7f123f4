"""The decoders' self-attention kinds, each one function over a layer's attention params that
writes its new KV-cache entries and attends over the whole cache.

  out, cache_a, cache_b = ATTENTIONS[cfg.ATTENTION](attn, h, cfg, rope, cache_a, cache_b,
                                                    offset, bias)

  * "gqa": grouped-query attention (`layers.project_qkv`: biases, q/k norms, clipping); the cache
    holds the rotated keys and the values, <f>[B, S, Hkv, hd] each.
  * "mla": DeepSeek-V3's multi-head latent attention. The cache holds what HF's caches: the
    normed KV latent <f>[B, S, 1, Rkv] and the rotated key part shared by all heads
    <f>[B, S, 1, r]; per step the latent is expanded by `kv_b` into per-head no-rope keys and
    values. q = q_b(rms(q_a(x))) (or q(x) without a q LoRA rank), split [nope n | rope r] per
    head; k = [kv_b(latent) nope part | shared rotated key]; scores scaled by (n + r)**-0.5.
    `q_a_norm` and `kv_a_norm` use eps 1e-6 whatever `rms_norm_eps` says (HF builds them without
    it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.models.common import rms_norm
from moe_jax.models.decoder import layers
from moe_jax.models.decoder.config import DecoderConfig

MLA_NORM_EPS = 1e-6


def _write(cache: jax.Array, new: jax.Array, offset) -> jax.Array:
  """cache <f>[B, S, n, w] with new <f>[B, L, n, w] written at slots offset .. offset + L - 1."""
  return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), offset, axis=1)


def gqa(attn: dict, h: jax.Array, cfg: DecoderConfig, rope, keys: jax.Array, values: jax.Array,
        offset, bias: jax.Array):
  """Grouped-query attention of h <f>[B, L, d] -> (<f>[B, L, d], keys, values updated)."""
  cos, sin = rope
  q, k, v = layers.project_qkv(attn, h, cfg)
  q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
  keys, values = _write(keys, k, offset), _write(values, v, offset)
  return jnp.dot(layers.attend(q, keys, values, bias), attn["o"]), keys, values


def mla(attn: dict, h: jax.Array, cfg: DecoderConfig, rope, latents: jax.Array,
        rope_keys: jax.Array, offset, bias: jax.Array):
  """Multi-head latent attention of h <f>[B, L, d] -> (<f>[B, L, d], latents, rope_keys)."""
  cos, sin = rope
  batch, length, _ = h.shape
  heads, nope, rope_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  if "q_a" in attn:
    q = jnp.dot(rms_norm(jnp.dot(h, attn["q_a"]), attn["q_a_norm"], MLA_NORM_EPS).astype(h.dtype),
                attn["q_b"])
  else:
    q = jnp.dot(h, attn["q"])
  q = q.reshape(batch, length, heads, nope + rope_dim)
  q_rot = layers.apply_rope(q[..., nope:], cos, sin, interleaved=cfg.rope_interleaved)
  compressed = jnp.dot(h, attn["kv_a"])                                   # [B, L, Rkv + r]
  latent = rms_norm(compressed[..., :cfg.kv_lora_rank], attn["kv_a_norm"], MLA_NORM_EPS)
  k_rot = layers.apply_rope(compressed[..., None, cfg.kv_lora_rank:], cos, sin,
                            interleaved=cfg.rope_interleaved)             # [B, L, 1, r]
  latents = _write(latents, latent[:, :, None, :], offset)
  rope_keys = _write(rope_keys, k_rot, offset)
  kv = jnp.dot(latents[:, :, 0].astype(h.dtype), attn["kv_b"])            # [B, S, H * (n + v)]
  kv = kv.reshape(batch, kv.shape[1], heads, nope + cfg.v_head_dim)
  shared = jnp.broadcast_to(rope_keys.astype(h.dtype), kv.shape[:3] + (rope_dim,))
  keys = jnp.concatenate([kv[..., :nope], shared], axis=-1)               # [B, S, H, n + r]
  query = jnp.concatenate([q[..., :nope], q_rot.astype(q.dtype)], axis=-1)
  out = layers.attend(query.astype(h.dtype), keys, kv[..., nope:], bias)  # [B, L, H * v]
  return jnp.dot(out, attn["o"]), latents, rope_keys


ATTENTIONS = {"gqa": gqa, "mla": mla}
