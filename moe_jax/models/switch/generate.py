"""Greedy decoding for Switch Transformers, fully jitted with fixed shapes.

The encoder runs once. Decoding starts from `decoder_start_token_id` and runs a `lax.while_loop`
over at most `max_new_tokens` steps, stopping early once every row has emitted `eos_token_id`
(`NO_EOS`: never; `SwitchModel.generate(eos_token_id=None)` passes it, as transformers'
`generate(eos_token_id=None)` does not stop at any token).

Output: <int32>[B, 1 + max_new_tokens], the start token followed by the generated tokens. As in
Hugging Face greedy `generate`, once a row has emitted eos, the rest of that row is `pad_token_id`.
HF stops as soon as all rows are done and so may return fewer columns; its output equals ours
truncated to its length (the columns we add past that point are all `pad_token_id`).

Two modes, matching HF's `use_cache`:
  * cached: a self-attention K/V cache of `max_new_tokens` positions, cross-attention K/V projected
    once; each step feeds one token per row, so its sparse blocks route one token per sequence and
    per-sequence capacity can never bind.
  * uncached: each step recomputes the decoder over the whole fixed-size token buffer (positions
    past the current one are causally invisible, so they change nothing) and reads the logits at
    the current position. Routing then sees the whole prefix, so capacity can drop tokens, as in
    HF's no-cache generation; the two modes may therefore legitimately differ when capacity binds.
    The `moe_fn` hook then also sees the not-yet-generated positions (pad tokens) of the buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.models.switch import stack as switch_stack
from moe_jax.models.switch.config import SwitchConfig
from moe_jax.moe_fn import MoEFn

NO_EOS = -1   # an eos id no token matches: decode all `max_new_tokens` steps


def greedy_generate(params: dict, cfg: SwitchConfig, input_ids: jax.Array,
                    attention_mask: jax.Array, *, max_new_tokens: int, use_cache: bool,
                    eos_token_id: int, pad_token_id: int,
                    moe_fn: MoEFn) -> jax.Array:
  """Greedy decoding (see the module docstring).

  Args:
    params: the Switch params tree.
    cfg: the model's `SwitchConfig` (gives `decoder_start_token_id`).
    input_ids: <int32>[B, Ls] encoder input.
    attention_mask: <int or bool>[B, Ls].
    max_new_tokens: decoding steps at most.
    use_cache: cached (True) or recompute-the-prefix (False) decoding.
    eos_token_id: a row is finished once it emits this id (`NO_EOS`, or any negative id, never
      matches).
    pad_token_id: fills finished rows.
    moe_fn: the sparse-FFN hook.

  Returns:
    <int32>[B, 1 + max_new_tokens].
  """
  batch = input_ids.shape[0]
  encoder_hidden, _ = switch_stack.encode(params, cfg, input_ids, attention_mask, moe_fn=moe_fn)
  cache = switch_stack.init_decoder_cache(params, cfg, encoder_hidden, max_new_tokens)
  tokens = jnp.full((batch, max_new_tokens + 1), pad_token_id, jnp.int32)
  tokens = tokens.at[:, 0].set(cfg.decoder_start_token_id)
  done = jnp.zeros((batch,), bool)

  def next_hidden_cached(step, tokens, cache):
    ids = jax.lax.dynamic_slice_in_dim(tokens, step, 1, axis=1)               # [B, 1]
    hidden, cache, _ = switch_stack.decode(params, cfg, ids, cache, attention_mask, moe_fn=moe_fn)
    return hidden, cache                                                      # [B, 1, d]

  def next_hidden_uncached(step, tokens, cache):
    fresh = cache.replace(length=jnp.zeros((), jnp.int32))                    # K/V rewritten
    hidden, _, _ = switch_stack.decode(params, cfg, tokens[:, :max_new_tokens], fresh,
                                       attention_mask, moe_fn=moe_fn)         # [B, N, d]
    return jax.lax.dynamic_slice_in_dim(hidden, step, 1, axis=1), cache

  next_hidden = next_hidden_cached if use_cache else next_hidden_uncached

  def keep_going(state):
    step, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def one_step(state):
    step, tokens, done, cache = state
    hidden, cache = next_hidden(step, tokens, cache)
    logits = switch_stack.lm_logits(params, cfg, hidden)[:, 0]                # [B, V]
    next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)                # first max on ties
    next_token = jnp.where(done, pad_token_id, next_token)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, next_token[:, None], step + 1, axis=1)
    return step + 1, tokens, done | (next_token == eos_token_id), cache

  state = (jnp.zeros((), jnp.int32), tokens, done, cache)
  _, tokens, _, _ = jax.lax.while_loop(keep_going, one_step, state)
  return tokens
