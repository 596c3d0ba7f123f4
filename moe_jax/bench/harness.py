"""The main job: run a model over held-out text under every replication policy and capacity
mode, and collect per-layer metrics.

Per capacity mode, two compiled programs: `none` (no replica slots at all) and one "dynamic"
program whose predictor kind is a traced argument, so history / pregate / learned / oracle share a
compilation and differ only in where replicas go. `oracle` uses the true loads of the same batch
from the `none` pass: an upper bound, never a serving policy.

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

  @property
  def decodes(self) -> bool:
    """Decoder-only families (left-padded prompts) have a decode phase (`bench.decode`)."""
    return getattr(self.family, "PADDING_SIDE", "") == "left"


def _forward(setup: BenchSetup, execution: ExecutionConfig,
             rcfg: replication.ReplicationConfig):
  """jit(params, batch, state, extras) -> (logits, records, next state)."""
  family, model_cfg, mesh, moe_cfg = setup.family, setup.model_cfg, setup.mesh, setup.moe_cfg

  @jax.jit
  def run(params, batch, state, extras):
    layers = family.moe_layers(params, model_cfg)
    runner = replication.StackRunner(rcfg, moe_cfg, mesh, layers, state, execution=execution,
                                     **extras)
    logits = family.forward_batch(params, model_cfg, batch, runner.moe_fn)
    return logits, runner.records(), runner.next_state()

  return run


def run_mode(setup: BenchSetup, batches: list[dict], capacity_mode: str, policies: list[str], *,
             repeats: int, warmup: list[dict] = ()) -> dict:
  """Runs every policy over `batches` in one capacity mode.

  `warmup` batches run first, unscored, so the history EMA starts from past batches as it would
  in a running server.

  Returns:
    policy -> {"records": [per batch: stack -> [LayerRecord as numpy]], "logits_rel_diff": float,
               "seconds": [per repeat: seconds for all batches], "tokens": int}.
  """
  step = _Stepper(setup, setup.execution.replace(capacity_mode=capacity_mode))
  results = {p: {"records": [], "logits_rel_diff": 0.0, "seconds": [], "tokens": 0}
             for p in policies}
  states = {p: step.initial_state() for p in policies}
  logging.info("[%s] %d warm-up + %d scored batches x %d policies; the first batch compiles the "
               "'none' program and the one program all replicating policies share",
               capacity_mode, len(warmup), len(batches), len(policies))
  for w, batch in enumerate(warmup):
    start = time.perf_counter()
    _, oracle, _ = step("none", batch, states["none"], None)
    for policy in policies:
      if policy != "none":
        states[policy] = step(policy, batch, states[policy], oracle)[2]
    jax.block_until_ready(states)
    logging.info("[%s] warm-up batch %d/%d: %.1f s", capacity_mode, w + 1, len(warmup),
                 time.perf_counter() - start)
  oracles = []
  for b, batch in enumerate(batches):
    start = time.perf_counter()
    logits, oracle, none_records = step("none", batch, states["none"], None)
    oracles.append(oracle)
    for policy in policies:
      if policy == "none":
        records = none_records
      else:
        out, records, states[policy] = step(policy, batch, states[policy], oracle)
        diff = relative_max_diff(out, logits)
        results[policy]["logits_rel_diff"] = max(results[policy]["logits_rel_diff"], diff)
      results[policy]["records"].append(distributed.gather(records))
    logging.info("[%s] batch %d/%d: ran %d policies in %.1f s", capacity_mode, b + 1,
                 len(batches), len(policies), time.perf_counter() - start)
  tokens = sum(setup.family.batch_tokens(b) for b in batches)
  for r in range(repeats):                      # interleaved timing rounds
    round_start = time.perf_counter()
    for policy in policies:
      state = states[policy]
      start = time.perf_counter()
      for batch, oracle in zip(batches, oracles):
        out = step(policy, batch, state, oracle, timing=True)
        jax.block_until_ready(out[0])
      results[policy]["seconds"].append(time.perf_counter() - start)
      results[policy]["tokens"] = tokens
    logging.info("[%s] timing round %d/%d: %.1f s", capacity_mode, r + 1, repeats,
                 time.perf_counter() - round_start)
  return results


def relative_max_diff(out: jax.Array, reference: jax.Array) -> float:
  """max |out - reference| / max |reference|: the invariant's fp32 bound is 1e-6 of this.

  Replicas regroup rows into different matmul shapes, so fp32 sums may round differently at
  the last bit; the scale-free form makes one tolerance fit logits of any magnitude.
  """
  scale = float(jnp.max(jnp.abs(reference)))
  return float(jnp.max(jnp.abs(out - reference))) / max(scale, jnp.finfo(jnp.float32).tiny)


class _Stepper:
  """One forward under a policy: `none` (no replica slots) or the shared dynamic program."""

  def __init__(self, setup: BenchSetup, execution: ExecutionConfig):
    self.setup = setup
    self.counts = {s: len(layers) for s, layers in setup.layers.items()}
    moe_cfg = setup.moe_cfg
    self.num_experts = moe_cfg.num_experts
    self.none_fn = _forward(setup, execution, replication.ReplicationConfig(predictor="none"))
    self.dynamic_fn = _forward(setup, execution, dataclasses.replace(setup.replication_cfg,
                                                                     predictor="dynamic"))
    self.learned = setup.learned
    if self.learned is None:   # keeps the dynamic program's shapes; "learned" is never selected
      self.learned = {s: [{"w": jnp.zeros((moe_cfg.d_model, moe_cfg.num_experts)),
                           "b": jnp.zeros((moe_cfg.num_experts,))} for _ in range(n - 1)]
                      for s, n in self.counts.items()}

  def initial_state(self):
    """Laid out on the mesh as the programs return it (so the next call hits the same program)."""
    state = replication.init_state(self.counts, self.num_experts)
    return distributed.from_host(jax.tree.map(np.asarray, state), self.setup.mesh)

  def __call__(self, policy, batch, state, oracle, timing=False):
    """none: (logits, true loads per stack, records); else (logits, records, next state)."""
    if policy == "none":
      logits, records, _ = self.none_fn(self.setup.params, batch, state, {})
      if timing:
        return (logits,)
      true = {s: jnp.stack([r.stats.tokens_per_expert for r in records[s]]).astype(jnp.float32)
              for s in self.counts}
      return logits, true, records
    extras = dict(learned=self.learned, oracle_loads=oracle,
                  policy=jnp.int32(replication.policy_index(policy)))
    return self.dynamic_fn(self.setup.params, batch, state, extras)


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
  setup = BenchSetup(family=family, model_cfg=model_cfg, params=model.params, moe_cfg=moe_cfg,
                     execution=job.execution, replication_cfg=job.replication, mesh=mesh,
                     layers=layers,
                     learned=None if learned is None else runtime.on_mesh(learned, mesh))
  return setup, batches


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
