"""The decode phase of the main job (decoder-only families): greedy decoding with the KV cache
under every replication policy, through the model's own `generate`.

Per capacity mode and policy one compiled `model.generate(..., replication=...)`: the placement is
re-issued one MoE layer ahead in the prefill and in every decode step inside its one loop, the
load history (and, with `resident`, the held replicas, kept unless `stickiness` says otherwise)
carried from step to step, each call starting from a fresh state. It returns a `LayerSummary` per
pass and MoE layer; pass 0 is the prompt's prefill (the prefill phase measures that), passes
1..N the decode steps kept here.

The prompts are the prefill phase's held-out windows (no padding); no eos, so every row decodes
all N steps. `none` runs first: its per-pass true loads become `oracle`'s loads
(`generate(oracle_loads=...)`, read by the pass counter inside the loop), valid because dropless
decoding emits the same tokens under every placement (checked: `same_tokens`). Where a policy's
tokens differ from `none`'s (capacity mode), its oracle loads are only those of `none`'s tokens.

Timing: a decode step costs (T(N steps) - T(1 step)) / (N - 1), both from the same compiled
program: the 1-step run passes every vocabulary id as an eos id (a traced argument of the same
shape as the no-eos run's), so each row stops after its first step.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import logging

from moe_jax import distributed
from moe_jax import predictor as predictor_lib

# Generation feeds no token embeddings to its passes, so the kinds that read the seed predictor
# (and its approximate mode) have no decode phase; every other kind runs through `model.generate(replication=...)`.
POLICIES = ("none",) + tuple(k for k in predictor_lib.PREDICTORS
                             if k not in predictor_lib.SEED_KINDS)


def run_decode(setup, batches: list[dict], capacity_mode: str, policies: list[str], *,
               steps: int, repeats: int, calibration: dict | None = None) -> dict:
  """Decodes `steps` tokens after every batch's prompts under every policy in one capacity mode.

  Args:
    setup: the `harness.BenchSetup` of a decoder-only family.
    batches: {"input_ids": <int32>[B, P]} held-out prompts (the prefill phase's batches).
    capacity_mode, policies: as `harness.run_mode`; policies include "none".
    steps: N >= 2 new tokens per row.
    repeats: timing rounds (interleaved over policies).
    calibration: eplb's calibration counts (stack -> [n, E]; the prefill phase's).

  Returns:
    policy -> {"summaries": [per batch: stack -> `LayerSummary` (numpy) of the decode steps,
               arrays [N, n layers, ...]], "tokens": [per batch <int32>[B, N]],
               "same_tokens": fraction of generated tokens equal to none's,
               "seconds": [per repeat: decode seconds (N - 1 steps) of all batches],
               "generate_seconds": [per repeat: seconds of the whole N-step generate calls],
               "timed_tokens": tokens the decode seconds generated, "steps": N}.
  """
  unknown = [p for p in policies if p not in POLICIES]
  if unknown:
    raise ValueError(f"policies {unknown} have no decode phase (it runs {POLICIES}).")
  generate = _Generator(setup, capacity_mode, steps, calibration)
  prompts = [np.asarray(distributed.gather(b["input_ids"]), np.int32) for b in batches]
  results = {p: {"summaries": [], "tokens": [], "same_tokens": 0.0, "seconds": [],
                 "generate_seconds": [], "timed_tokens": 0, "steps": steps} for p in policies}
  logging.info("[%s] decode: %d batches x %d policies, %d greedy steps each; each policy's first "
               "batch compiles its generate program", capacity_mode, len(batches), len(policies),
               steps)
  oracles = []
  for b, ids in enumerate(prompts):
    start = time.perf_counter()
    none_tokens, none_stats = generate("none", ids, None)
    oracle = {s: layer.tokens_per_expert for s, layer in none_stats.layers.items()}
    oracles.append(oracle)
    for policy in policies:
      tokens, stats = ((none_tokens, none_stats) if policy == "none"
                       else generate(policy, ids, oracle))
      _keep(results[policy], tokens, stats, ids.shape[1], steps)
    logging.info("[%s] decode batch %d/%d: ran %d policies in %.1f s", capacity_mode, b + 1,
                 len(prompts), len(policies), time.perf_counter() - start)
  reference = np.stack(results["none"]["tokens"])
  for policy in policies:
    results[policy]["same_tokens"] = float(np.mean(np.stack(results[policy]["tokens"])
                                                   == reference))
  for r in range(repeats):
    round_start = time.perf_counter()
    for policy in policies:
      full = one = 0.0
      for ids, oracle in zip(prompts, oracles):
        one += _timed(lambda: generate(policy, ids, oracle, stop=True))
        full += _timed(lambda: generate(policy, ids, oracle))
      results[policy]["seconds"].append(full - one)
      results[policy]["generate_seconds"].append(full)
      results[policy]["timed_tokens"] = sum(ids.shape[0] * (steps - 1) for ids in prompts)
    logging.info("[%s] decode timing round %d/%d: %.1f s", capacity_mode, r + 1, repeats,
                 time.perf_counter() - round_start)
  return results


def _keep(result: dict, tokens, stats, prompt: int, steps: int) -> None:
  """Appends one batch's generated tokens and decode-step summaries (passes 1..N) to `result`."""
  passes = int(stats.passes)
  if passes != steps + 1:
    raise RuntimeError(f"generate ran {passes} passes, expected the prefill + {steps} steps.")
  layers = distributed.gather(stats.layers)
  result["summaries"].append({s: jax.tree.map(lambda a: a[1:passes], summary)
                              for s, summary in layers.items()})
  result["tokens"].append(np.asarray(distributed.gather(tokens))[:, prompt:])


def _timed(call) -> float:
  start = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - start


class _Generator:
  """`model.generate` of one capacity mode under a policy: (tokens <int32>[B, P + N], stats)."""

  def __init__(self, setup, capacity_mode: str, steps: int, calibration: dict | None):
    execution = setup.execution.replace(capacity_mode=capacity_mode)
    self.model = setup.family.Model(setup.model_cfg, setup.params, mesh=setup.mesh,
                                    execution=execution)
    self.setup, self.steps, self.calibration = setup, steps, calibration
    vocab = setup.model_cfg.vocab_size
    self.no_eos = np.full((vocab,), -1, np.int32)     # no row ever stops
    self.all_eos = np.arange(vocab, dtype=np.int32)   # every row stops after its first step

  def __call__(self, policy: str, ids: np.ndarray, oracle: dict | None, *, stop: bool = False):
    extras = {}
    if policy in predictor_lib.LEARNED_KINDS:
      extras["learned"] = self.setup.learned
    if policy == "oracle":
      extras["oracle_loads"] = oracle
    if policy == "eplb" and self.calibration is not None:
      extras["calibration"] = self.calibration
    rcfg = dataclasses.replace(self.setup.replication_cfg, predictor=policy)
    return self.model.generate(ids, np.ones_like(ids), max_new_tokens=self.steps,
                               eos_token_id=self.all_eos if stop else self.no_eos,
                               replication=rcfg, return_stats=True, **extras)
