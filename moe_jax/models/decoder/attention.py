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
    A prompt expands the latents into keys and values; a one-token decode step attends in the
    latent space instead (kv_b absorbed into the query and the output: O(S * H * Rkv) per step).
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
  kv_b = attn["kv_b"].reshape(cfg.kv_lora_rank, heads, nope + cfg.v_head_dim)
  if length == 1:
    out = _absorbed(q[..., :nope], q_rot.astype(q.dtype), latents, rope_keys, kv_b, bias, nope)
  else:
    out = _expanded(q[..., :nope], q_rot.astype(q.dtype), latents, rope_keys, kv_b, bias, nope)
  return jnp.dot(out.reshape(batch, length, -1).astype(h.dtype), attn["o"]), latents, rope_keys


def _expanded(q_nope, q_rot, latents, rope_keys, kv_b, bias, nope):
  """MLA by expanding the cached latents into per-head keys and values: <f>[B, L, H, v].

  Per query pass O(S * Rkv * H * (n + v)) for the expansion: the cheaper form for a prompt."""
  kv = jnp.einsum("bsr,rhw->bshw", latents[:, :, 0].astype(q_nope.dtype), kv_b)  # [B,S,H,n+v]
  shared = jnp.broadcast_to(rope_keys.astype(q_nope.dtype), kv.shape[:3] + rope_keys.shape[-1:])
  keys = jnp.concatenate([kv[..., :nope], shared], axis=-1)                # [B, S, H, n + r]
  query = jnp.concatenate([q_nope, q_rot], axis=-1)
  out = layers.attend(query, keys, kv[..., nope:], bias)                   # [B, L, H * v]
  return out.reshape(q_nope.shape[:3] + (-1,))


def _absorbed(q_nope, q_rot, latents, rope_keys, kv_b, bias, nope):
  """MLA in the latent space (kv_b's key half folded into the query, its value half applied
  after attending): the same numbers as `_expanded` to rounding, with O(S * H * Rkv) work per
  decode step instead of expanding the whole cache. <f>[B, L, H, v]."""
  scale = (nope + q_rot.shape[-1]) ** -0.5
  latent = latents[:, :, 0].astype(q_nope.dtype)                           # [B, S, Rkv]
  q_latent = jnp.einsum("blhn,rhn->blhr", q_nope, kv_b[..., :nope])
  scores = (jnp.einsum("blhr,bsr->bhls", q_latent, latent)
            + jnp.einsum("blhp,bsp->bhls", q_rot, rope_keys[:, :, 0].astype(q_rot.dtype)))
  scores = scores * scale + bias[:, None]
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(latent.dtype)
  context = jnp.einsum("bhls,bsr->blhr", weights, latent)                  # [B, L, H, Rkv]
  return jnp.einsum("blhr,rhv->blhv", context, kv_b[..., nope:])


ATTENTIONS = {"gqa": gqa, "mla": mla}
