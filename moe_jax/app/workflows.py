"""End-to-end jobs behind the launch scripts: train a model family on the pydoc text, record
routing traces, train the learned predictor, report per-layer balance. Each takes a typed launch
`Job` (`moe_jax.app.config`) and reads the model only through its family's interface.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from moe_jax import distributed, replication
from moe_jax.app import data as data_lib
from moe_jax.app import predictor_training, runtime, training
from moe_jax.app.config import Job, UsageError
from moe_jax.moe_fn import DefaultMoE


def pydoc_windows(job: Job, tokenizer, split: str) -> dict:
  """The family's windows over the train or held-out pydoc topics."""
  train_topics, held_out = data_lib.split_topics()
  texts = list((train_topics if split == "train" else held_out).values())
  stream = data_lib.token_stream(texts, tokenizer)
  stride = job.train.stride if split == "train" else None
  try:
    return job.family.text_windows(stream, stride=stride, **dict(job.data.window))
  except ValueError as e:   # windows longer than the text
    flags = ", ".join(f"--config.data.{name}={value}" for name, value in job.data.window)
    raise UsageError(f"{e} ({split} text; {flags})") from None


def train_on_pydoc(job: Job, out_dir: str, *, force: bool = False) -> dict:
  """Trains tokenizer + model; saves both to `out_dir`; returns the summary stored with them."""
  if not out_dir:
    raise UsageError("nowhere to save the trained model: pass --config.train.out_dir=DIR (or "
                     "--config.checkpoint=DIR).")
  from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
  family, model_cfg = job.family, job.model
  if os.path.exists(os.path.join(out_dir, orbax_io.MANIFEST_NAME)) and not force:
    raise UsageError(f"{out_dir} already holds a model; pass --force to retrain it.")
  if model_cfg.vocab_size != job.train.vocab_size:
    raise UsageError(f"--config.model.vocab_size={model_cfg.vocab_size} must equal "
                     f"--config.train.vocab_size={job.train.vocab_size}.")
  os.makedirs(out_dir, exist_ok=True)
  train_topics, _ = data_lib.split_topics()
  logging.info("training a %d-piece SentencePiece vocabulary on %d topics", model_cfg.vocab_size,
               len(train_topics))
  spiece = data_lib.train_tokenizer(list(train_topics.values()),
                                    os.path.join(out_dir, "spiece.model"),
                                    vocab_size=model_cfg.vocab_size)
  tokenizer = data_lib.load_tokenizer(spiece)
  train_data = pydoc_windows(job, tokenizer, "train")
  eval_data = pydoc_windows(job, tokenizer, "held_out")
  logging.info("%d train windows, %d held-out windows (%s)", len(train_data["input_ids"]),
               len(eval_data["input_ids"]), dict(job.data.window))
  mesh, moe_fn, replicator = training_setup(job)
  start = time.time()
  t = job.train
  params, history = training.train(
      family, model_cfg, train_data, moe_fn=moe_fn, steps=t.steps, batch_size=t.batch_size,
      learning_rate=t.learning_rate, warmup=t.warmup, weight_decay=t.weight_decay, seed=t.seed,
      log_every=t.log_every, eval_data=eval_data, eval_every=t.eval_every, mesh=mesh,
      replicator=replicator)
  skew = load_skew(job, params, eval_data)
  summary = {
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
      "data": "pydoc_data.topics (held out: every topic whose sha256(name) % 8 == 0)",
      "train_seconds": round(time.time() - start, 1),
      "final": history[-1], "history": history, "skew": skew,
  }
  if os.path.exists(os.path.join(out_dir, "params")):
    shutil.rmtree(os.path.join(out_dir, "params"))
  orbax_io.save_params(out_dir, params, config_json=model_cfg.to_hf_dict(), family=family.NAME,
                       key_map=family.hf_key_map(model_cfg), metadata=summary, force=True)
  return summary


def training_setup(job: Job):
  """(mesh, moe_fn, replicator or None) of a training run: config.mesh's mesh, the MoE layers
  run with config.execution and --config.train.gmm_backend, and with
  --config.train.replication=history|pregate a `Replicator` (config.replication's slots and
  decay) whose state the train step carries."""
  mesh = runtime.make_mesh(job.mesh)
  moe_cfg = job.family.moe_config(job.model, jnp.float32)
  runtime.check_experts_fit(moe_cfg.num_experts, mesh, job.mesh)
  execution = job.execution.replace(gmm_backend=job.train.gmm_backend)
  if job.train.replication == "none":
    return mesh, DefaultMoE(moe_cfg, execution, mesh), None
  rcfg = replication.ReplicationConfig(
      predictor=job.train.replication, num_replica_slots=job.replication.num_replica_slots,
      first_layer=job.replication.first_layer, history_decay=job.replication.history_decay)
  return (mesh, DefaultMoE(moe_cfg, execution, mesh),
          replication.Replicator(rcfg, moe_cfg, mesh, execution))


class _LayerStats:
  """A `moe_fn` hook around `inner` keeping each MoE layer's MoEStats ("stack/index" -> stats)."""

  def __init__(self, inner):
    self.inner, self.stats = inner, {}

  def moe_fn(self, stack, index, ff_params, x, routing):
    y, stats = self.inner(stack, index, ff_params, x, routing)
    self.stats[f"{stack}/{index}"] = stats
    return y, stats


def load_skew(job: Job, params, windows: dict) -> dict:
  """Per MoE layer: tokens per expert on `windows`, and max/mean expert load."""
  family, model_cfg = job.family, job.model
  inner = DefaultMoE(family.moe_config(model_cfg, jnp.float32))

  @jax.jit
  def count(params, batch):
    recorder = _LayerStats(inner)
    family.forward_batch(params, model_cfg, batch, recorder.moe_fn)
    return {key: stats.tokens_per_expert for key, stats in recorder.stats.items()}

  params = jax.tree.map(jnp.asarray, params)
  order = _layer_order(family.moe_layers(params, model_cfg))
  totals = {key: 0 for key in order}
  for batch in data_lib.batches(windows, job.data.batch_size):
    counts = count(params, batch)
    for key in order:
      totals[key] = totals[key] + np.asarray(counts[key])
  return {key: {"tokens_per_expert": np.asarray(total).tolist(),
                "max_over_mean": float(np.max(total) / max(np.mean(total), 1e-9))}
          for key, total in totals.items()}


def _layer_order(layers: dict) -> list[str]:
  return [f"{stack}/{i}" for stack, params in layers.items() for i in range(len(params))]


def record_traces(job: Job, model_cfg, params, windows: dict, *, num_batches: int) -> dict:
  """Routing traces (layer inputs + router probs per MoE layer) over `num_batches` batches."""
  family = job.family
  recorder = predictor_training.TraceRecorder(
      DefaultMoE(family.moe_config(model_cfg, jnp.float32), job.execution))

  @jax.jit
  def record(params, batch):
    recorder.inputs, recorder.probs = {}, {}
    family.forward_batch(params, model_cfg, batch, recorder.moe_fn)
    return recorder.traces()

  traces = []
  for i, batch in enumerate(data_lib.batches(windows, job.data.batch_size, seed=1)):
    if i >= num_batches:
      break
    traces.append(jax.tree.map(np.asarray, record(params, batch)))
    logging.info("recorded routing traces of batch %d/%d", i + 1, num_batches)
  return predictor_training.concat_traces(traces)


PREDICTOR_EVAL_BATCHES = 8   # held-out batches the trained predictor is scored on


def train_predictor(job: Job, out_dir: str, *, force: bool = False) -> dict:
  """Records traces on the train split, trains the learned predictor (per-token map and load
  head), scores them and pregate on held-out traces (`predictor_training.evaluate`), saves it to
  `out_dir`; returns its metadata."""
  model, tokenizer = runtime.load_model(job)
  if tokenizer is None:
    raise UsageError(f"{job.checkpoint} has no spiece.model to tokenise pydoc text.")
  windows = pydoc_windows(job, tokenizer, "train")
  traces = record_traces(job, model.config, model.params, windows,
                         num_batches=job.train.predictor_batches)
  routers = {stack: [ff["router"] for ff in layers]
             for stack, layers in job.family.moe_layers(model.params, model.config).items()}
  top_k = job.family.moe_config(model.config, jnp.float32).top_k
  learned = predictor_training.train_learned(
      traces, routers, rank=job.predictor_rank, steps=job.train.predictor_steps,
      batch_size=512, learning_rate=3e-3, seed=job.train.seed, top_k=top_k)
  held_out = record_traces(job, model.config, model.params,
                           pydoc_windows(job, tokenizer, "held_out"),
                           num_batches=PREDICTOR_EVAL_BATCHES)
  scores = predictor_training.evaluate(held_out, learned, routers, top_k=top_k)
  for pair, by_kind in scores.items():
    logging.info("held-out %s: %s", pair, "  ".join(
        f"{kind} {predictor_training.format_scores(m)}" for kind, m in by_kind.items()))
  metadata = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "checkpoint": job.checkpoint, "rank": job.predictor_rank,
              "tokens": int(next(iter(traces.values()))[0][0].shape[0]),
              "held_out_tokens": int(next(iter(held_out.values()))[0][0].shape[0]),
              "held_out": scores}
  predictor_training.save_learned(out_dir, learned, metadata=metadata, force=force)
  return metadata


def prompt_rows(job: Job, model_cfg, tokenizer, *, texts: list[str], ids: str) -> list[list[int]]:
  """Prompt token ids of launch/infer.py's --text (one row each) or --ids ("37,423,5").

  UsageError unless every prompt is non-empty, within the vocabulary and at most
  config.data.max_input_tokens long (attention memory grows with the square of the length).
  """
  family = job.family
  if ids:
    try:
      rows = [[int(t) for t in ids.split(",")]]
    except ValueError:
      raise UsageError(f"--ids={ids!r} must be comma-separated token ids, e.g. --ids=37,423,5."
                       ) from None
  elif texts:
    if tokenizer is None:
      raise UsageError("this checkpoint has no spiece.model; pass --ids instead of --text.")
    if any(not text.strip() for text in texts):
      raise UsageError("--text is empty: give the text to continue, e.g. "
                       "--text=\"The assert statement\".")
    rows = [family.prompt_ids(tokenizer, text, model_cfg) for text in texts]
  else:
    raise UsageError("give --text=... or --ids=...")
  vocab = getattr(model_cfg, "vocab_size", None)
  outside = sorted({t for row in rows for t in row if t < 0 or (vocab and t >= vocab)})
  if outside:
    raise UsageError(f"--ids has ids {outside[:5]} outside the vocabulary [0, {vocab}).")
  limit, longest = job.data.max_input_tokens, max(len(row) for row in rows)
  if longest > limit:
    raise UsageError(f"the prompt is {longest} tokens long, more than "
                     f"--config.data.max_input_tokens={limit} (memory grows with the square of "
                     "the length); shorten it, or raise --config.data.max_input_tokens if this "
                     "host has the memory.")
  return rows


def pad_batch(rows: list[list[int]], multiple: int, pad_id: int, *, side: str = "right"):
  """(<int32>[B, L] ids, mask) padded on `side` (the family's PADDING_SIDE); B rounded up to a
  multiple of the data axis."""
  length = max(len(r) for r in rows)
  batch = -(-len(rows) // multiple) * multiple
  ids = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for i, row in enumerate(rows):
    span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
    ids[i, span] = row
    mask[i, span] = 1
  mask[len(rows):, 0 if side == "right" else -1] = 1   # filler rows: one visible pad token
  return jnp.asarray(ids), jnp.asarray(mask)


def replica_bytes_of(job: Job, model, input_ids, mask) -> float:
  """Expert-weight bytes the model's own MoE hook moves into replica slots over the prompt pass
  (summed over layers): 0 for `DefaultMoE`, which runs home slots only."""

  @jax.jit
  def run(params, input_ids, mask):
    recorder = _LayerStats(model.moe_fn)
    job.family.prompt_pass(params, model.config, input_ids, mask, recorder.moe_fn)
    return sum(stats.replica_bytes for stats in recorder.stats.values())

  return float(distributed.gather(run(model.params, input_ids, mask)))


def balance_lines(job: Job, model, input_ids, mask, mesh) -> list[str]:
  """Per MoE layer of the pass over the prompt: tokens per device and balancedness, none vs the
  configured predictor.

  In a multi-process job every process must call it (it runs the prompt pass); all get the lines.
  """
  family, rcfg = job.family, job.replication
  layers = family.moe_layers(model.params, model.config)
  counts = {s: len(v) for s, v in layers.items()}
  moe_cfg = family.moe_config(model.config, jnp.float32)
  lines = [f"per-layer balance of the prompt pass (mesh data={mesh.shape['data']} x "
           f"expert={mesh.shape['expert']}, r={rcfg.num_replica_slots}, "
           f"predictor={rcfg.predictor}):"]
  for kind in dict.fromkeys(("none", rcfg.predictor)):
    if kind in ("learned", "oracle", "dynamic"):
      lines.append(f"  ({kind}: see launch/bench.py for this policy)")
      continue
    replication_cfg = replication.ReplicationConfig(predictor=kind,
                                                    num_replica_slots=rcfg.num_replica_slots)

    @jax.jit
    def measure(params, input_ids, mask, replication_cfg=replication_cfg):
      runner = replication.StackRunner(
          replication_cfg, moe_cfg, mesh, family.moe_layers(params, model.config),
          replication.init_state(counts, moe_cfg.num_experts), execution=job.execution)
      family.prompt_pass(params, model.config, input_ids, mask, runner.moe_fn)
      records = runner.records()
      return {s: [(r.stats.tokens_per_device, r.stats.balancedness) for r in records[s]]
              for s in records}

    stats = distributed.gather(measure(model.params, input_ids, mask))
    for stack in (s for s in layers if s in stats):
      for i, (per_device, balance) in enumerate(stats[stack]):
        lines.append(f"  {kind:8s} {stack}/{i}: tokens per device "
                     f"{per_device.reshape(-1).tolist()} balancedness {float(balance):.2f}")
  return lines
