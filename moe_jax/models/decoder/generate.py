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

With a `replication.Replicator`, every decoder pass (the prefill and each step) runs its MoE
layers through a fresh `StackRunner`: each layer's replicas are placed one MoE layer ahead from
that pass's hidden states, and the `ReplicationState` (load history, resident replicas) is
carried from pass to pass in the loop. The router still decides every token, so the tokens are
the same with any placement. That is what makes the `oracle` predictor possible here (benchmarks
only): the per-pass true loads of an earlier run of the same prompts (`GenerationStats.layers`'
`tokens_per_expert`) are fed back as `oracle_loads`, and pass p reads row p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import replication
from moe_jax.models.decoder import stack
from moe_jax.models.decoder.config import DecoderConfig
from moe_jax.moe_fn import MoEFn


def generation_positions(mask: jax.Array) -> jax.Array:
  """<int32>[B, S] HF's generation positions of a 0/1 mask: cumsum - 1, 0 at padding."""
  mask = mask.astype(jnp.int32)
  return jnp.where(mask == 0, 0, jnp.cumsum(mask, axis=-1) - 1)


@struct.dataclass
class GenerationStats:
  """What replication did during one `greedy_generate` (replicated runs only).

  Attributes:
    state: the `ReplicationState` after the last pass.
    replica_rows: <int32>[] token-choices computed in replica slots over all passes.
    passes: <int32>[] decoder passes run (the prefill + decode steps, or uncached steps).
    layers: stack -> `replication.LayerSummary` of every pass and MoE layer, arrays
      [max passes, n layers, ...] (pass 0: the prefill when cached); passes >= `passes` are 0.
  """

  state: replication.ReplicationState
  replica_rows: jax.Array
  passes: jax.Array
  layers: dict


def greedy_generate(params: dict, cfg: DecoderConfig, input_ids: jax.Array,
                    attention_mask: jax.Array, *, max_new_tokens: int, use_cache: bool,
                    eos_token_ids: jax.Array, pad_token_id: int, moe_fn: MoEFn,
                    replicator: replication.Replicator | None = None,
                    learned: dict | None = None, oracle_loads: dict | None = None,
                    calibration: dict | None = None):
  """Greedy decoding (see the module docstring).

  Args:
    params, cfg: the model.
    input_ids: <int32>[B, P] left-padded prompts.
    attention_mask: <int or bool>[B, P], 0 at padding.
    max_new_tokens: N, decoding steps at most.
    use_cache: KV-cached (True) or recompute-the-buffer (False) decoding.
    eos_token_ids: <int32>[n] a row is finished once it emits any of these (-1: none).
    pad_token_id: fills finished rows.
    moe_fn: the MoE hook (unused with a replicator).
    replicator: optional; replicate experts in every pass (see the module docstring).
    learned: the learned predictor's params, for a replicator with predictor="learned".
    oracle_loads: for a replicator with predictor="oracle": stack -> <f32>[passes, n, E] the true
      loads of every pass and MoE layer (pass 0: the prefill when cached), indexed by the pass
      counter inside the loop; e.g. `GenerationStats.layers[stack].tokens_per_expert` of a run
      of the same prompts with predictor="none" (valid because the tokens are the same).
    calibration: for a replicator with predictor="eplb": stack -> <f32>[n, E] the counts it
      places from (see `replication.calibrate`).

  Returns:
    <int32>[B, P + N]; with a replicator, (that, `GenerationStats`).
  """
  batch, prompt = input_ids.shape
  total = prompt + max_new_tokens
  tokens = jnp.concatenate(
      [input_ids, jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)], axis=1)
  mask = jnp.concatenate([jnp.asarray(attention_mask).astype(jnp.int32),
                          jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)   # [B, S]
  positions = generation_positions(mask)
  dtype = params["embed"].dtype
  emit = _emitter(params, cfg, prompt=prompt, pad_token_id=pad_token_id,
                  eos_token_ids=eos_token_ids)
  run = _decoder_pass(params, cfg, mask, moe_fn=moe_fn, replicator=replicator, learned=learned,
                      oracle_loads=oracle_loads)

  def keep_going(state):
    return (state[0] < max_new_tokens) & ~jnp.all(state[2])

  def cached_step(state):
    step, tokens, done, stats, cache, hidden = state
    token, tokens, done = emit(step, tokens, done, hidden)
    slot_positions = jax.lax.dynamic_slice_in_dim(positions, prompt + step, 1, axis=1)
    hidden, cache, stats = run(token[:, None], slot_positions, cache, stats)
    return step + 1, tokens, done, stats, cache, hidden

  def uncached_step(state):
    step, tokens, done, stats = state
    hidden, _, stats = run(tokens, positions, stack.init_cache(cfg, batch, total, dtype), stats)
    hidden = jax.lax.dynamic_slice_in_dim(hidden, prompt + step - 1, 1, axis=1)  # [B, 1, d]
    _, tokens, done = emit(step, tokens, done, hidden)
    return step + 1, tokens, done, stats

  step0, done0 = jnp.zeros((), jnp.int32), jnp.zeros((batch,), bool)
  stats = (None if replicator is None else
           _initial_stats(params, cfg, replicator, passes=max_new_tokens + use_cache,
                          calibration=calibration))
  if not use_cache:
    out = jax.lax.while_loop(keep_going, uncached_step, (step0, tokens, done0, stats))
  else:
    cache = stack.init_cache(cfg, batch, total, dtype)
    hidden, cache, stats = run(input_ids, positions[:, :prompt], cache, stats)   # prefill
    state = (step0, tokens, done0, stats, cache, hidden[:, -1:])
    out = jax.lax.while_loop(keep_going, cached_step, state)
  return out[1] if replicator is None else (out[1], out[3])


def _emitter(params: dict, cfg: DecoderConfig, *, prompt: int, pad_token_id: int,
             eos_token_ids: jax.Array):
  """emit(step, tokens, done, hidden): appends argmax(logits of hidden <f>[B, 1, d]) at slot
  P + step of tokens <int32>[B, S] (pad for finished rows); returns (token, tokens, done)."""
  eos = jnp.asarray(eos_token_ids, jnp.int32)

  def emit(step, tokens, done, hidden):
    logits = stack.lm_logits(params, cfg, hidden)[:, 0]                       # [B, V]
    token = jnp.where(done, pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], prompt + step, axis=1)
    return token, tokens, done | jnp.isin(token, eos)

  return emit


def _decoder_pass(params: dict, cfg: DecoderConfig, mask: jax.Array, *, moe_fn: MoEFn,
                  replicator, learned, oracle_loads):
  """run(ids, pos, cache, stats) -> (hidden, cache, stats): one decoder pass over the buffer's
  `mask` <int32>[B, S], through a fresh stack runner when replicating (stats is then the
  `GenerationStats` carried from pass to pass; unused otherwise)."""

  def run(ids, pos, cache, stats):
    if replicator is None:
      hidden, cache, _ = stack.decode(params, cfg, ids, pos, mask, cache, moe_fn=moe_fn)
      return hidden, cache, stats
    return _replicated_pass(params, cfg, ids, pos, mask, cache, stats, replicator=replicator,
                            learned=learned, oracle_loads=oracle_loads)

  return run


def _initial_stats(params: dict, cfg: DecoderConfig, replicator: replication.Replicator, *,
                   passes: int, calibration: dict | None = None) -> GenerationStats:
  """Fresh `GenerationStats` with room for `passes` passes' layer summaries."""
  zero, layers = jnp.zeros((), jnp.int32), stack.moe_layers(params, cfg)
  state = replicator.init_state(layers)
  if calibration is not None:   # checked on the host by DecoderModel.generate
    state = state.replace(calibration={s: jnp.asarray(c, jnp.float32)
                                       for s, c in calibration.items()})
  return GenerationStats(state=state, replica_rows=zero, passes=zero,
                         layers=replicator.empty_summaries(layers, passes))


def _replicated_pass(params, cfg, ids, pos, mask, cache, stats: GenerationStats, *, replicator,
                     learned, oracle_loads):
  """One decoder pass through a fresh `StackRunner` from `stats.state`: (hidden, cache, stats
  with this pass's summaries at index `stats.passes`)."""
  oracle = (None if oracle_loads is None else
            {s: loads[stats.passes].astype(jnp.float32) for s, loads in oracle_loads.items()})
  runner = replicator.runner(stack.moe_layers(params, cfg), stats.state, learned, oracle)
  hidden, cache, _ = stack.decode(params, cfg, ids, pos, mask, cache, moe_fn=runner.moe_fn)
  layers = jax.tree.map(lambda kept, new: kept.at[stats.passes].set(new), stats.layers,
                        runner.summaries())
  return hidden, cache, GenerationStats(state=runner.next_state(),
                                        replica_rows=stats.replica_rows + runner.replica_rows(),
                                        passes=stats.passes + 1, layers=layers)
