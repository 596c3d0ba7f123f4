"""The main job: run a model over held-out text under every replication policy and capacity
mode, and collect per-layer metrics.

Per capacity mode, the programs of `moe_jax.bench.programs`: `none` (no replica slots at all),
one "dynamic" program whose predictor kind is a traced argument (every kind placed ahead of its
layer shares it), `reactive`, and the approximate mode through the family's loss. `oracle` uses
the true loads of the same batch from the `none` pass: an upper bound, never a serving policy.

The model is any family (`moe_jax.models`): the harness reads it only through the family's
`moe_layers`, `forward_batch` and `batch_tokens`.
"""

from __future__ import annotations

import dataclasses
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moe_jax import distributed, replication
from moe_jax.bench import programs
from moe_jax.config import ExecutionConfig, MoEConfig


@dataclasses.dataclass
class BenchSetup:
  """Everything a policy run needs (typed; built by `load_setup`)."""

  family: types.ModuleType
  model_cfg: Any
  params: dict
  moe_cfg: MoEConfig
  execution: ExecutionConfig
  replication_cfg: replication.ReplicationConfig
  mesh: jax.sharding.Mesh
  layers: dict                       # stack -> MoE layer params in order (family.moe_layers)
  learned: dict | None               # stack -> learned predictor params, or None
  seed: dict | None = None           # stack -> seed predictor params, or None

  @property
  def decodes(self) -> bool:
    """Decoder-only families (left-padded prompts) have a decode phase (`bench.decode`)."""
    return getattr(self.family, "PADDING_SIDE", "") == "left"


def run_mode(setup: BenchSetup, batches: list[dict], capacity_mode: str, policies: list[str], *,
             repeats: int, warmup: list[dict] = (), calibration: dict | None = None) -> dict:
  """Runs every policy over `batches` in one capacity mode.

  `warmup` batches run first, unscored, so the history EMA starts from past batches as it would
  in a running server; their true loads (summed) calibrate `eplb` unless `calibration` (stack ->
  <f>[n, E] counts, e.g. from `moe_jax.expert_counts.load`) is given. `programs.APPROX` among
  the policies runs the approximate mode and measures its quality against the exact model.

  Returns:
    policy -> {"records": [per batch: stack -> [LayerRecord as numpy]], "logits_rel_diff": float
               (NaN for the approximate mode), "seconds": [per repeat: seconds for all batches],
               "tokens": int, "quality": [per batch: loss metrics] (none and the approximate
               mode)}; "none" also has "calibration": the counts eplb was calibrated with.
  """
  step = programs.Stepper(setup, setup.execution.replace(capacity_mode=capacity_mode))
  results = {p: {"records": [], "logits_rel_diff": 0.0, "seconds": [], "tokens": 0,
                 "quality": []} for p in policies}
  states = {p: step.initial_state() for p in policies}
  logging.info("[%s] %d warm-up + %d scored batches x %d policies; the first batch compiles the "
               "'none' program and the one program the ahead-of-layer policies share",
               capacity_mode, len(warmup), len(batches), len(policies))
  warm_counts = _warm_up(step, states, warmup, policies, capacity_mode)
  calibration = calibration if calibration is not None else warm_counts
  results["none"]["calibration"] = calibration
  if "eplb" in policies:
    if calibration is None:
      logging.warning("[%s] eplb has no calibration (no warm-up batches, no counts file): it "
                      "places from zero counts until its first refresh", capacity_mode)
    else:
      states["eplb"] = step.calibrated(states["eplb"], calibration)
  oracles = []
  for b, batch in enumerate(batches):
    start = time.perf_counter()
    logits, none_records, states["none"] = step("none", batch, states["none"], None)
    oracle = step.true_loads(none_records)
    oracles.append(oracle)
    for policy in policies:
      if policy == "none":
        records = none_records
      else:
        out, records, states[policy] = step(policy, batch, states[policy], oracle)
        _score(results[policy], step, policy, out, logits, batch, states["none"],
               results["none"])
      results[policy]["records"].append(distributed.gather(records))
    logging.info("[%s] batch %d/%d: ran %d policies in %.1f s", capacity_mode, b + 1,
                 len(batches), len(policies), time.perf_counter() - start)
  _time_rounds(step, states, batches, oracles, policies, results, repeats, capacity_mode)
  tokens = sum(setup.family.batch_tokens(b) for b in batches)
  for policy in policies:
    results[policy]["tokens"] = tokens
  return results


def _warm_up(step, states, warmup, policies, capacity_mode) -> dict | None:
  """Runs the warm-up batches through every policy; returns their summed true loads."""
  counts = None
  for w, batch in enumerate(warmup):
    start = time.perf_counter()
    _, records, states["none"] = step("none", batch, states["none"], None)
    oracle = step.true_loads(records)
    counts = oracle if counts is None else jax.tree.map(jnp.add, counts, oracle)
    for policy in policies:
      if policy != "none":
        states[policy] = step(policy, batch, states[policy], oracle)[2]
    jax.block_until_ready(states)
    logging.info("[%s] warm-up batch %d/%d: %.1f s", capacity_mode, w + 1, len(warmup),
                 time.perf_counter() - start)
  return None if counts is None else jax.tree.map(np.asarray, distributed.gather(counts))


def _score(result, step, policy, out, logits, batch, none_state, none_result) -> None:
  """Output difference vs none (exact policies) or quality vs the exact model (approx)."""
  if policy == programs.APPROX:
    result["logits_rel_diff"] = float("nan")
    result["quality"].append(_floats(out))
    none_result["quality"].append(_floats(step.quality(batch, none_state)))
    return
  diff = relative_max_diff(out, logits)
  result["logits_rel_diff"] = max(result["logits_rel_diff"], diff)


def _floats(metrics: dict) -> dict:
  return {k: float(distributed.gather(v)) for k, v in metrics.items() if np.ndim(v) == 0}


def _time_rounds(step, states, batches, oracles, policies, results, repeats, capacity_mode):
  """Interleaved timing rounds: every policy over every batch, `repeats` times."""
  for r in range(repeats):
    round_start = time.perf_counter()
    for policy in policies:
      state = states[policy]
      start = time.perf_counter()
      for batch, oracle in zip(batches, oracles):
        out = step(policy, batch, state, oracle)
        jax.block_until_ready(out[0])
      results[policy]["seconds"].append(time.perf_counter() - start)
    logging.info("[%s] timing round %d/%d: %.1f s", capacity_mode, r + 1, repeats,
                 time.perf_counter() - round_start)


def relative_max_diff(out: jax.Array, reference: jax.Array) -> float:
  """max |out - reference| / max |reference|: the invariant's fp32 bound is 1e-6 of this.

  Replicas regroup rows into different matmul shapes, so fp32 sums may round differently at
  the last bit; the scale-free form makes one tolerance fit logits of any magnitude.
  """
  scale = float(jnp.max(jnp.abs(reference)))
  return float(jnp.max(jnp.abs(out - reference))) / max(scale, jnp.finfo(jnp.float32).tiny)


def load_setup(job, mesh) -> tuple[BenchSetup, list[dict]]:
  """Model, MoE/replication configs, learned predictor and held-out batches (warm-up batches
  first) of a launch `Job` (`moe_jax.app.config`)."""
  from moe_jax.app import data as data_lib  # pylint: disable=import-outside-toplevel
  from moe_jax.app import runtime, workflows  # pylint: disable=import-outside-toplevel
  model, tokenizer = _load_model(job, mesh)
  num_data = mesh.shape["data"]
  if job.data.batch_size % num_data:
    raise runtime.UsageError(f"--config.data.batch_size={job.data.batch_size} is not divisible "
                             f"by --config.mesh.data={num_data}; change one of them.")
  windows = workflows.pydoc_windows(job, tokenizer, "held_out")
  wanted = job.bench.warmup_batches + job.data.num_batches
  batches = list(data_lib.batches(windows, job.data.batch_size))[:wanted]
  if not batches:
    raise runtime.UsageError("held-out text gave no full batch; lower --config.data.batch_size.")
  if len(batches) < wanted:
    raise runtime.UsageError(f"held-out text gives {len(batches)} batches of "
                             f"{job.data.batch_size}, fewer than --config.bench.warmup_batches + "
                             f"--config.data.num_batches = {wanted}; lower one of them.")
  # Every process tokenises the same held-out text; from_host copies in only its devices' part.
  batches = [distributed.from_host(b, mesh) for b in batches]
  family, model_cfg = job.family, model.config
  layers = family.moe_layers(model.params, model_cfg)
  moe_cfg = family.moe_config(model_cfg, jnp.float32)
  learned = runtime.load_learned_predictor(job, {s: len(v) for s, v in layers.items()},
                                           moe_cfg.d_model, moe_cfg.num_experts)
  seed = _load_seed(job, layers)
  setup = BenchSetup(family=family, model_cfg=model_cfg, params=model.params, moe_cfg=moe_cfg,
                     execution=job.execution, replication_cfg=job.replication, mesh=mesh,
                     layers=layers,
                     learned=None if learned is None else runtime.on_mesh(learned, mesh),
                     seed=None if seed is None else runtime.on_mesh(seed, mesh))
  return setup, batches


def _load_seed(job, layers: dict) -> dict | None:
  """The seed predictor of config.seed_predictor_checkpoint, or None if unset/absent."""
  import os  # pylint: disable=import-outside-toplevel
  from moe_jax.app import runtime, seed_training  # pylint: disable=import-outside-toplevel
  path = job.seed_predictor_path
  if not job.seed_predictor_checkpoint or not os.path.isdir(path):
    return None
  try:
    return seed_training.restore_for_layers(path, layers)
  except ValueError as e:
    raise runtime.UsageError(f"--config.seed_predictor_checkpoint={job.seed_predictor_checkpoint}"
                             f" does not fit this model ({e}); pass the seed predictor trained "
                             "for it, or --config.seed_predictor_checkpoint= to run without "
                             "seed.") from None


RANDOM = "random"          # --config.checkpoint=random: random params of config.model
RANDOM_VOCABULARY = "builtin:switch_tiny/spiece.model"   # 2048 pieces of pydoc text


def _load_model(job, mesh):
  """(the family's Model, its SentencePiece tokenizer) of config.checkpoint, or for
  `--config.checkpoint=random` random params of config.model (seed config.seed) with the shipped
  2048-piece pydoc vocabulary: a smoke run, its routing that of random weights."""
  from moe_jax.app import data as data_lib  # pylint: disable=import-outside-toplevel
  from moe_jax.app import presets, runtime  # pylint: disable=import-outside-toplevel
  if not job.checkpoint:
    raise runtime.UsageError("no checkpoint given: set --config.checkpoint=DIR (a Hugging Face or "
                             "moe_jax orbax dir with spiece.model), or --config.checkpoint="
                             "random for random params of config.model (a smoke run).")
  if job.checkpoint != RANDOM:
    model, tokenizer = runtime.load_model(job, mesh=mesh)
    if tokenizer is None:
      raise runtime.UsageError(f"{job.checkpoint} has no spiece.model: the benchmark tokenises "
                               "held-out pydoc text with the checkpoint's own vocabulary.")
    return model, tokenizer
  tokenizer = data_lib.load_tokenizer(presets.resolve_checkpoint(RANDOM_VOCABULARY))
  cfg = job.model
  if cfg.vocab_size < tokenizer.vocab_size():
    raise runtime.UsageError(f"--config.checkpoint=random tokenises with the shipped "
                             f"{tokenizer.vocab_size()}-piece vocabulary: set "
                             f"--config.model.vocab_size>={tokenizer.vocab_size()}.")
  runtime.check_experts_fit(job.family.moe_config(cfg, jnp.float32).num_experts, mesh, job.mesh)
  params = placed_random_params(job.family, cfg, mesh, seed=job.seed)
  return job.family.Model(cfg, params, mesh=mesh, execution=job.execution), tokenizer


def placed_random_params(family, cfg, mesh, *, seed: int = 0) -> dict:
  """The family's random f32 params on `mesh` as a checkpoint import places them: expert stacks
  sharded over 'expert', every other leaf replicated (each process copies in its devices' part)."""
  from moe_jax.checkpoints import hf_io, layout  # pylint: disable=import-outside-toplevel
  place = hf_io.device_placer(mesh, "expert", family.hf_key_map(cfg).expert_paths())
  flat = layout.flatten(family.random_params(cfg, seed=seed))
  return layout.build_tree({path: place(path, leaf) for path, leaf in flat.items()})


def describe(job, setup: BenchSetup, batches: list[dict], mesh) -> dict:
  """The report's meta section."""
  devices = jax.devices()
  tokens = sum(setup.family.batch_tokens(b) for b in batches)
  r = setup.replication_cfg.num_replica_slots
  summary = (f"{job.checkpoint}: {setup.moe_cfg.num_experts} experts, "
             f"{sum(len(v) for v in setup.layers.values())} MoE layers; mesh "
             f"data={mesh.shape['data']} x expert={mesh.shape['expert']} on {len(devices)} "
             f"{devices[0].platform} device(s); r={r} replica slots/device; {len(batches)} "
             f"held-out batches, {tokens} tokens")
  return {"summary": summary, "checkpoint": job.checkpoint, "family": setup.family.NAME,
          "stacks": list(setup.layers), "mesh": dict(mesh.shape),
          "platform": devices[0].platform, "num_devices": len(devices),
          "num_replica_slots": r, "batches": len(batches), "tokens": tokens, "config": job.tree,
          "note": ("tokens/s on simulated CPU devices measures overhead, not the straggler effect: "
                   "all devices share the host's cores. 'modelled_ep_speedup_vs_none' is the "
                   "ratio of summed per-layer max device loads (EP step time model).")}
