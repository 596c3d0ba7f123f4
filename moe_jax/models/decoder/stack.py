"""The decoder stack, as pure functions over the params tree (documented in `config.py`).

Every layer is pre-norm: `x += attn(rms(x)); x += mlp(rms(x))`, then a final norm and the head.
MoE layers hand their normed input to one overridable hook, with the single stack name "layers":

  y, stats = moe_fn("layers", moe_index, mlp_params, x_normed, None)

`moe_index` counts the MoE layers from 0; `None` lets the layer's own router decide (the family's
rule, `moe_jax.routing.ROUTERS`, in float32: exactly HF's router). A family's shared expert (and
its sigmoid gate) is added to the hook's output here: it is dense, so replication never moves it.
Padding tokens are routed like any other, as in HF; dropless, they cannot affect real tokens.

One function, `decode`, serves every pass: a prompt or a teacher-forced sequence is the special
case of an empty cache as long as the input; a generation step is one token written at
`cache.length`. Queries attend to cache slots at or before their own (causal) whose key-padding
mask is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import moe_layer
from moe_jax.models.common import rms_norm
from moe_jax.models.decoder import attention, layers
from moe_jax.models.decoder.config import DecoderConfig
from moe_jax.moe_fn import MoEFn

STACK = "layers"   # the one stack name MoE layers are called with


@struct.dataclass
class KVCache:
  """Preallocated attention state (fixed shapes, jit-friendly).

  Attributes:
    keys, values: per layer the attention's two cached arrays <f>[B, S, n, w] (`cfg.cache_widths`
      gives (n, w)): GQA's rotated keys and values, MLA's latent and shared rotated key (see
      `attention.py`); slots >= `length` unused.
    length: <int32>[] slots written so far (the next token's slot).
  """

  keys: tuple
  values: tuple
  length: jax.Array


@struct.dataclass
class MoELayerRouting:
  """What the router of one MoE layer decided (HF's top-k, in its order: best first).

  Attributes:
    expert_index: <int32>[B, L, k] chosen experts.
    expert_weight: <f32>[B, L, k] their weights in the output sum.
    router_logits: <f32>[B, L, E] raw router logits (HF's `router_logits`).
    router_probs: <f32>[B, L, E] softmax of the logits.
    stats: the `MoEStats` of the layer call (loads per expert / slot / device).
  """

  expert_index: jax.Array
  expert_weight: jax.Array
  router_logits: jax.Array
  router_probs: jax.Array
  stats: moe_layer.MoEStats


def init_cache(cfg: DecoderConfig, batch: int, max_length: int, dtype) -> KVCache:
  """An empty cache of `max_length` slots per row."""
  first, second = (jnp.zeros((batch, max_length) + widths, dtype) for widths in cfg.cache_widths)
  n = cfg.num_hidden_layers
  return KVCache(keys=(first,) * n, values=(second,) * n, length=jnp.zeros((), jnp.int32))


def moe_layers(params: dict, cfg: DecoderConfig) -> dict[str, list[dict]]:
  """The stack-runner view: {"layers": [MoE layer params {"router", "wi_gate", "wi", "wo"}]}."""
  return {STACK: [params["layers"][i]["mlp"] for i in cfg.sparse_layers]}


def lm_logits(params: dict, cfg: DecoderConfig, hidden: jax.Array) -> jax.Array:
  """<f>[B, L, d] final-normed states -> <f32>[B, L, V] (tied: the embedding's transpose)."""
  if cfg.tie_word_embeddings:
    return jnp.einsum("bld,vd->blv", hidden, params["embed"], preferred_element_type=jnp.float32)
  return jnp.einsum("bld,dv->blv", hidden, params["lm_head"], preferred_element_type=jnp.float32)


def _moe_mlp(layer, x_normed, moe_index, moe_fn):
  """The MoE block: routed experts through the hook, plus the shared expert if any."""
  batch, length, _ = x_normed.shape
  y, stats = moe_fn(STACK, moe_index, layer["mlp"], x_normed, None)
  if "shared_mlp" in layer:
    shared = layers.swiglu(layer["shared_mlp"], x_normed)
    if "shared_gate" in layer:
      gate = jnp.dot(x_normed.astype(jnp.float32), layer["shared_gate"].astype(jnp.float32))
      shared = jax.nn.sigmoid(gate).astype(shared.dtype) * shared
    y = y + shared.astype(y.dtype)
  routing = stats.routing
  shape = lambda a: a.reshape(batch, length, -1)
  record = MoELayerRouting(expert_index=shape(routing.expert_ids),
                           expert_weight=shape(routing.combine_weights),
                           router_logits=shape(routing.logits), router_probs=shape(routing.probs),
                           stats=stats)
  return y, record


def decode(params: dict, cfg: DecoderConfig, input_ids: jax.Array, positions: jax.Array,
           key_mask: jax.Array, cache: KVCache, *, moe_fn: MoEFn
           ) -> tuple[jax.Array, KVCache, tuple[MoELayerRouting, ...]]:
  """The decoder over L new tokens written at cache slots `cache.length + arange(L)`.

  Args:
    params: the params tree.
    cfg: its config.
    input_ids: <int32>[B, L].
    positions: <int>[B, L] rotary positions of the new tokens.
    key_mask: <int or bool>[B, S] 1 where a cache slot holds a real token (0 = padding), over all
      S slots of the cache (slots after a query are masked causally anyway).
    cache: from `init_cache` (or a previous call).
    moe_fn: the MoE hook.

  Returns:
    (<f>[B, L, d] final-normed hidden states, the updated cache, one `MoELayerRouting` per MoE
    layer).
  """
  x = params["embed"][input_ids]                                              # [B, L, d]
  offset = cache.length
  slots = cache.keys[0].shape[1]
  query_slots = offset + jnp.arange(input_ids.shape[1])
  allowed = jnp.arange(slots)[None, :] <= query_slots[:, None]                # [L, S]
  allowed = allowed[None] & jnp.asarray(key_mask).astype(bool)[:, None, :]    # [B, L, S]
  bias = layers.additive_mask(allowed, x.dtype)
  rope = layers.rope_tables(positions, cfg.rotary_width, cfg.rope_theta)
  attend = attention.ATTENTIONS[cfg.ATTENTION]
  sparse = set(cfg.sparse_layers)
  new_keys, new_values, records = [], [], []
  for i, layer in enumerate(params["layers"]):
    h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
    out, keys, values = attend(layer["attn"], h, cfg, rope, cache.keys[i], cache.values[i],
                               offset, bias)
    new_keys.append(keys)
    new_values.append(values)
    x = x + out
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    if i in sparse:
      y, record = _moe_mlp(layer, h, len(records), moe_fn)
      records.append(record)
    else:
      y = layers.swiglu(layer["mlp"], h)
    x = x + y.astype(x.dtype)
  cache = cache.replace(keys=tuple(new_keys), values=tuple(new_values),
                        length=offset + input_ids.shape[1])
  return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cache, tuple(records)


def load_balancing_loss(records: tuple[MoELayerRouting, ...],
                        token_mask: jax.Array | None = None) -> jax.Array:
  """HF's auxiliary loss over all MoE layers: E * sum_e f_e * P_e.

  f_e is the fraction of (layer, token) rows that chose e among their top-k (so sum_e f_e = k),
  P_e the mean router probability of e, both over every MoE layer's tokens (weighted by
  `token_mask` <int or bool>[B, L] when given: HF passes the attention mask).
  """
  num_experts = records[0].router_probs.shape[-1]
  weight = (jnp.ones(records[0].expert_index.shape[:2], jnp.float32) if token_mask is None
            else jnp.asarray(token_mask).astype(jnp.float32))                # [B, L]
  chosen = sum(jnp.einsum("blke,bl->e", jax.nn.one_hot(r.expert_index, num_experts,
                                                       dtype=jnp.float32), weight)
               for r in records)
  probs = sum(jnp.einsum("ble,bl->e", r.router_probs, weight) for r in records)
  rows = len(records) * jnp.sum(weight)          # HF's normaliser: rows, not rows * k
  return num_experts * jnp.sum((chosen / rows) * (probs / rows))
