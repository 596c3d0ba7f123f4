"""Greedy decoding for decoder-only models, fully jitted with fixed shapes.

Output: <int32>[B, P + max_new_tokens], the prompt followed by the generated tokens. As in
transformers' greedy `generate`, a row that has emitted an eos id continues with the pad id; HF
stops once every row is done and so may return fewer columns: its output equals ours truncated to
its length.

Prompts are left-padded (HF's `padding_side="left"`): `attention_mask` is 0 on the leading pads.
Positions are transformers' generation positions, `cumsum(mask) - 1` with pads at 0, so each row's
first real token is at position 0; pad keys are masked out of every query.

Two modes, matching HF's `use_cache`, which give identical tokens:
  * cached: a KV cache of P + max_new_tokens slots is allocated once; a prefill pass writes the
    prompt, then each `lax.while_loop` step feeds one token per row (the last step also feeds the
    final token, whose logits are unused);
  * uncached: each step recomputes the whole fixed-size buffer (slots after the current one are
    causally invisible) and reads the hidden state of the last written slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.models.decoder import stack
from moe_jax.models.decoder.config import DecoderConfig
from moe_jax.moe_fn import MoEFn


def generation_positions(mask: jax.Array) -> jax.Array:
  """<int32>[B, S] HF's generation positions of a 0/1 mask: cumsum - 1, 0 at padding."""
  mask = mask.astype(jnp.int32)
  return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)


def greedy_generate(params: dict, cfg: DecoderConfig, input_ids: jax.Array,
                    attention_mask: jax.Array, *, max_new_tokens: int, use_cache: bool,
                    eos_token_ids: jax.Array, pad_token_id: int,
                    moe_fn: MoEFn) -> jax.Array:
  """Greedy decoding (see the module docstring).

  Args:
    params, cfg: the model.
    input_ids: <int32>[B, P] left-padded prompts.
    attention_mask: <int or bool>[B, P], 0 at padding.
    max_new_tokens: N, decoding steps at most.
    use_cache: KV-cached (True) or recompute-the-buffer (False) decoding.
    eos_token_ids: <int32>[n] a row is finished once it emits any of these (-1: none).
    pad_token_id: fills finished rows.
    moe_fn: the MoE hook.

  Returns:
    <int32>[B, P + N].
  """
  batch, prompt = input_ids.shape
  total = prompt + max_new_tokens
  tokens = jnp.concatenate(
      [input_ids, jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)], axis=1)
  mask = jnp.concatenate([jnp.asarray(attention_mask).astype(jnp.int32),
                          jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)   # [B, S]
  positions = generation_positions(mask)
  dtype = params["embed"].dtype
  eos = jnp.asarray(eos_token_ids, jnp.int32)

  def emit(step, tokens, done, hidden):
    """Appends argmax(logits of hidden <f>[B, 1, d]) at slot P + step; returns (token, ...)."""
    logits = stack.lm_logits(params, cfg, hidden)[:, 0]                       # [B, V]
    token = jnp.where(done, pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], prompt + step, axis=1)
    return token, tokens, done | jnp.isin(token, eos)

  def keep_going(state):
    return (state[0] < max_new_tokens) & ~jnp.all(state[2])

  def cached_step(state):
    step, tokens, done, cache, hidden = state
    token, tokens, done = emit(step, tokens, done, hidden)
    slot_positions = jax.lax.dynamic_slice_in_dim(positions, prompt + step, 1, axis=1)
    hidden, cache, _ = stack.decode(params, cfg, token[:, None], slot_positions, mask, cache,
                                    moe_fn=moe_fn)
    return step + 1, tokens, done, cache, hidden

  def uncached_step(state):
    step, tokens, done = state
    hidden, _, _ = stack.decode(params, cfg, tokens, positions, mask,
                                stack.init_cache(cfg, batch, total, dtype), moe_fn=moe_fn)
    hidden = jax.lax.dynamic_slice_in_dim(hidden, prompt + step - 1, 1, axis=1)  # [B, 1, d]
    _, tokens, done = emit(step, tokens, done, hidden)
    return step + 1, tokens, done

  step0, done0 = jnp.zeros((), jnp.int32), jnp.zeros((batch,), bool)
  if not use_cache:
    return jax.lax.while_loop(keep_going, uncached_step, (step0, tokens, done0))[1]
  cache = stack.init_cache(cfg, batch, total, dtype)
  hidden, cache, _ = stack.decode(params, cfg, input_ids, positions[:, :prompt], mask, cache,
                                  moe_fn=moe_fn)                              # prefill
  state = (step0, tokens, done0, cache, hidden[:, -1:])
  return jax.lax.while_loop(keep_going, cached_step, state)[1]
