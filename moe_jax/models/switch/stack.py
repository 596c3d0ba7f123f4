"""The Switch Transformer encoder and decoder stacks, as pure functions over the params tree.

The params tree is documented in `moe_jax/models/switch/config.py`. Every sublayer is pre-norm
(`x = x + sublayer(rms_norm(x))`); block 0 of each stack owns the relative-position bias table,
which every block of that stack reuses; cross-attention has no position bias.

Sparse FFN blocks route with the library's float32 top-1 router on the normed FFN input, apply
Hugging Face's per-sequence `expert_capacity` as a router-stage rule (dropped tokens contribute 0,
so the block passes its input through), and then call one overridable hook:

  y, stats = moe_fn(stack, sparse_index, ff_params, x_normed, routing)

where `stack` is "encoder" or "decoder", `sparse_index` counts the sparse blocks of that stack from
0, `x_normed` is <f>[B, L, d] and `routing` the (capacity-masked) `Routing` of its B * L tokens. The
default hook, `moe_jax.moe_fn.DefaultMoE`, is `moe_jax.moe_apply` with home slots only;
replication/prediction substitute their own hook, which may change where experts run but never the
routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import moe_layer
from moe_jax import routing as routing_lib
from moe_jax.models.switch import layers
from moe_jax.models.switch.config import SwitchConfig
from moe_jax.moe_fn import MoEFn

STACKS = ("encoder", "decoder")


@struct.dataclass
class SparseLayerRouting:
  """What the router of one sparse block decided, in HF's terms.

  Attributes:
    expert_index: <int32>[B, L] top-1 expert, before capacity (HF's argmax of the router probs).
    dispatched: <bool>[B, L] False where HF's per-sequence capacity dropped the token (its FFN
      output is 0; the block passes its input through).
    router_prob: <f32>[B, L] the top-1 probability, which scales the expert output.
    router_logits: <f32>[B, L, E] raw router logits (HF's `router_logits`, input of the losses).
    stats: the `MoEStats` of the MoE layer call.
  """

  expert_index: jax.Array
  dispatched: jax.Array
  router_prob: jax.Array
  router_logits: jax.Array
  stats: moe_layer.MoEStats


@struct.dataclass
class DecoderCache:
  """Decoder attention state for incremental decoding (fixed shapes, jit-friendly).

  Attributes:
    self_keys, self_values: per block <f>[B, H, max_length, d_kv]; positions >= `length` are unused.
    cross_keys, cross_values: per block <f>[B, H, Ls, d_kv], projected once from the encoder output.
    length: <int32>[] decoder positions written so far (the next query's position).
  """

  self_keys: tuple
  self_values: tuple
  cross_keys: tuple
  cross_values: tuple
  length: jax.Array


# --- embeddings and head ---


def embedding_table(params: dict, cfg: SwitchConfig, stack: str) -> jax.Array:
  """<f>[V, d]: `shared` for tied models; `{stack}_embed` for untied ones (transformers 5)."""
  return params["shared"] if cfg.tie_word_embeddings else params[f"{stack}_embed"]


def lm_logits(params: dict, cfg: SwitchConfig, hidden: jax.Array) -> jax.Array:
  """<f>[B, L, d] decoder output -> <f32>[B, L, V].

  Tied: `(hidden * d_model**-0.5) @ shared.T` (Mesh-TF's rescale); untied: `hidden @ lm_head`.
  """
  if cfg.tie_word_embeddings:
    hidden = hidden * (cfg.d_model ** -0.5)
    return jnp.einsum("bld,vd->blv", hidden, params["shared"], preferred_element_type=jnp.float32)
  return jnp.einsum("bld,dv->blv", hidden, params["lm_head"], preferred_element_type=jnp.float32)


# --- FFN sublayer ---


def route(ff_params: dict, x_normed: jax.Array, cfg: SwitchConfig) -> routing_lib.Routing:
  """HF Switch routing of <f>[B, L, d] tokens: float32 top-1, then per-sequence capacity.

  Padding tokens are routed and use capacity, as in HF. With `cfg.expert_capacity` None nothing is
  dropped (dropless).
  """
  batch, length, width = x_normed.shape
  num_experts = ff_params["router"].shape[-1]
  routing = routing_lib.top_k_route(x_normed.reshape(batch * length, width), ff_params["router"],
                                    top_k=1)
  if cfg.expert_capacity is None:
    return routing
  keep = routing_lib.sequence_capacity_mask(
      routing.expert_ids.reshape(batch, length, 1), routing.dispatch_mask.reshape(batch, length, 1),
      num_experts, cfg.expert_capacity)                                        # [B, L, 1]
  return routing.with_dispatch_mask(keep.reshape(batch * length, 1))


def _sparse_ffn(ff_params, x_normed, cfg, *, stack, sparse_index, moe_fn):
  batch, length, _ = x_normed.shape
  routing = route(ff_params, x_normed, cfg)
  y, stats = moe_fn(stack, sparse_index, ff_params, x_normed, routing)
  record = SparseLayerRouting(
      expert_index=routing.expert_ids.reshape(batch, length),
      dispatched=routing.dispatch_mask.reshape(batch, length),
      router_prob=routing.combine_weights.reshape(batch, length),
      router_logits=routing.logits.reshape(batch, length, -1), stats=stats)
  return y, record


def _ff_sublayer(block, x, cfg, *, is_sparse, stack, sparse_index, moe_fn):
  """x + FFN(rms_norm(x)); returns (x, SparseLayerRouting or None)."""
  x_normed = layers.rms_norm(x, block["ff_norm"], cfg.layer_norm_epsilon)
  if not is_sparse:
    return x + layers.dense_ffn(block["ff"], x_normed), None
  y, record = _sparse_ffn(block["ff"], x_normed, cfg, stack=stack, sparse_index=sparse_index,
                          moe_fn=moe_fn)
  return x + y.astype(x.dtype), record


def moe_layers(params: dict, cfg: SwitchConfig) -> dict[str, list[dict]]:
  """The stack-runner view: stack name -> its sparse FFN params {"router", "wi", "wo"}, in order."""
  return {stack: [params[stack]["blocks"][i]["ff"] for i in cfg.sparse_blocks(stack)]
          for stack in STACKS}


def _attention_out(attn, query, keys, values, bias):
  return jnp.dot(layers.attend(query, keys, values, bias), attn["o"])


# --- encoder ---


def encode(params: dict, cfg: SwitchConfig, input_ids: jax.Array, attention_mask: jax.Array, *,
           moe_fn: MoEFn) -> tuple[jax.Array, tuple[SparseLayerRouting, ...]]:
  """The encoder stack.

  Args:
    params: the Switch params tree.
    cfg: the model's `SwitchConfig`.
    input_ids: <int32>[B, Ls].
    attention_mask: <int or bool>[B, Ls], 0 at padding (padding queries are still computed).
    moe_fn: the sparse-FFN hook.

  Returns:
    (<f>[B, Ls, d] final-normed hidden states, one `SparseLayerRouting` per sparse block).
  """
  enc = params["encoder"]
  x = embedding_table(params, cfg, "encoder")[input_ids]                       # [B, Ls, d]
  positions = jnp.arange(input_ids.shape[1])
  bias = layers.position_bias(enc["relative_attention_bias"], positions, positions,
                              bidirectional=True,
                              max_distance=cfg.relative_attention_max_distance)
  keys_allowed = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]     # [B, 1, 1, Ls]
  bias = bias + layers.additive_mask(keys_allowed, x.dtype)                    # [B, H, Ls, Ls]
  sparse = cfg.sparse_blocks("encoder")
  records = []
  for i, block in enumerate(enc["blocks"]):
    attn = block["attn"]
    h = layers.rms_norm(x, block["attn_norm"], cfg.layer_norm_epsilon)
    q, k, v = (layers.split_heads(h, attn[n], cfg.num_heads) for n in ("q", "k", "v"))
    x = x + _attention_out(attn, q, k, v, bias)
    x, record = _ff_sublayer(block, x, cfg, is_sparse=i in sparse, stack="encoder",
                             sparse_index=len(records), moe_fn=moe_fn)
    if record is not None:
      records.append(record)
  return layers.rms_norm(x, enc["final_norm"], cfg.layer_norm_epsilon), tuple(records)


# --- decoder ---


def init_decoder_cache(params: dict, cfg: SwitchConfig, encoder_hidden: jax.Array,
                       max_length: int) -> DecoderCache:
  """An empty self-attention cache of `max_length` positions and the cross-attention K/V.

  Args:
    encoder_hidden: <f>[B, Ls, d] the encoder output.
    max_length: decoder positions the cache can hold.
  """
  batch = encoder_hidden.shape[0]
  blocks = params["decoder"]["blocks"]
  dtype = encoder_hidden.dtype
  d_kv = blocks[0]["attn"]["k"].shape[1] // cfg.num_heads
  empty = jnp.zeros((batch, cfg.num_heads, max_length, d_kv), dtype)
  project = lambda block, n: layers.split_heads(encoder_hidden, block["cross"][n], cfg.num_heads)
  return DecoderCache(self_keys=(empty,) * len(blocks), self_values=(empty,) * len(blocks),
                      cross_keys=tuple(project(b, "k") for b in blocks),
                      cross_values=tuple(project(b, "v") for b in blocks),
                      length=jnp.zeros((), jnp.int32))


def decode(params: dict, cfg: SwitchConfig, decoder_input_ids: jax.Array, cache: DecoderCache,
           encoder_mask: jax.Array, *, moe_fn: MoEFn, decoder_key_mask: jax.Array | None = None
           ) -> tuple[jax.Array, DecoderCache, tuple[SparseLayerRouting, ...]]:
  """The decoder stack over Lq new positions, starting at `cache.length`.

  A whole teacher-forced sequence is the special case of an empty cache of exactly Lq positions;
  one generation step is Lq = 1. Query positions are `cache.length + arange(Lq)`; each attends to
  the cached keys at or before its own position (causal), through the unidirectional position bias.

  Args:
    decoder_input_ids: <int32>[B, Lq].
    cache: from `init_decoder_cache` (or a previous call).
    encoder_mask: <int or bool>[B, Ls] the encoder's attention mask (keys of the cross-attention).
    moe_fn: the sparse-FFN hook.
    decoder_key_mask: optional <bool>[B, max_length] padding mask over decoder key positions
      (HF's `decoder_attention_mask`), combined with the causal mask.

  Returns:
    (<f>[B, Lq, d] final-normed hidden states, the updated cache, one `SparseLayerRouting` per
    sparse block).
  """
  dec = params["decoder"]
  x = embedding_table(params, cfg, "decoder")[decoder_input_ids]              # [B, Lq, d]
  offset = cache.length
  max_length = cache.self_keys[0].shape[2]
  query_positions = offset + jnp.arange(decoder_input_ids.shape[1])
  key_positions = jnp.arange(max_length)
  allowed = (key_positions[None, :] <= query_positions[:, None])[None, None]   # [1, 1, Lq, Lmax]
  if decoder_key_mask is not None:
    allowed = allowed & jnp.asarray(decoder_key_mask).astype(bool)[:, None, None, :]
  self_bias = layers.position_bias(dec["relative_attention_bias"], query_positions,
                                   key_positions, bidirectional=False,
                                   max_distance=cfg.relative_attention_max_distance)
  self_bias = self_bias + layers.additive_mask(allowed, x.dtype)
  cross_allowed = jnp.asarray(encoder_mask).astype(bool)[:, None, None, :]     # [B, 1, 1, Ls]
  cross_bias = layers.additive_mask(cross_allowed, x.dtype)
  sparse = cfg.sparse_blocks("decoder")
  self_keys, self_values, records = [], [], []
  for i, block in enumerate(dec["blocks"]):
    attn, cross = block["attn"], block["cross"]
    h = layers.rms_norm(x, block["attn_norm"], cfg.layer_norm_epsilon)
    q, k, v = (layers.split_heads(h, attn[n], cfg.num_heads) for n in ("q", "k", "v"))
    keys = _write_positions(cache.self_keys[i], k, offset)                   # [B, H, Lmax, d_kv]
    values = _write_positions(cache.self_values[i], v, offset)
    self_keys.append(keys)
    self_values.append(values)
    x = x + _attention_out(attn, q, keys, values, self_bias)
    h = layers.rms_norm(x, block["cross_norm"], cfg.layer_norm_epsilon)
    q = layers.split_heads(h, cross["q"], cfg.num_heads)
    x = x + _attention_out(cross, q, cache.cross_keys[i], cache.cross_values[i], cross_bias)
    x, record = _ff_sublayer(block, x, cfg, is_sparse=i in sparse, stack="decoder",
                             sparse_index=len(records), moe_fn=moe_fn)
    if record is not None:
      records.append(record)
  cache = cache.replace(self_keys=tuple(self_keys), self_values=tuple(self_values),
                        length=offset + decoder_input_ids.shape[1])
  hidden = layers.rms_norm(x, dec["final_norm"], cfg.layer_norm_epsilon)
  return hidden, cache, tuple(records)


def _write_positions(buffer, update, offset):
  """<f>[B, H, Lmax, d_kv] with `update` <f>[B, H, Lq, d_kv] written at positions offset..."""
  return jax.lax.dynamic_update_slice_in_dim(buffer, update.astype(buffer.dtype), offset, axis=2)


# --- router losses (HF semantics) ---


def _finite_rows(router_logits):
  """(logits with non-finite token rows zeroed, <f32>[B, T, 1] 1 for finite rows, 0 otherwise).

  A token whose router input is not finite is routed nowhere (see `routing.finite_tokens`); the
  losses leave it out, so one bad token cannot turn them NaN. With every token finite they are
  HF's losses exactly."""
  logits = router_logits.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(logits), axis=-1, keepdims=True)
  return jnp.where(finite, logits, 0.0), finite.astype(jnp.float32)


def router_z_loss(router_logits: jax.Array) -> jax.Array:
  """<f32>[B, T, E] -> <f32>[]: sum over (finite) tokens of logsumexp(logits)^2, divided by their
  number (B * T when all are finite)."""
  logits, finite = _finite_rows(router_logits)
  log_z = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return jnp.sum(jnp.square(log_z) * finite) / jnp.maximum(jnp.sum(finite), 1.0)


def load_balancing_loss(router_logits: jax.Array) -> jax.Array:
  """<f32>[B, T, E] -> <f32>[]: E^2 * mean over (b, e) of fraction routed * mean probability.

  The fraction uses the argmax of the raw logits before capacity (transformers 5 / flaxformer);
  both means run over the finite tokens of each sequence.
  """
  logits, finite = _finite_rows(router_logits)
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1) * finite
  routed = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_experts, dtype=jnp.float32) * finite
  count = jnp.maximum(jnp.sum(finite, axis=1), 1.0)                            # [B, 1]
  per_group = (jnp.sum(routed, axis=1) / count) * (jnp.sum(probs, axis=1) / count)   # [B, E]
  return jnp.mean(per_group) * num_experts ** 2


def stack_router_losses(records: tuple[SparseLayerRouting, ...], sparse_step: int):
  """(z_loss, aux_loss) of one stack: its sparse blocks' logits concatenated on the sequence axis.

  HF reports 0 for both unless the stack's sparse step is > 1.
  """
  if sparse_step <= 1 or not records:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  logits = jnp.concatenate([r.router_logits for r in records], axis=1)        # [B, nL * L, E]
  return router_z_loss(logits), load_balancing_loss(logits)
