"""End-to-end jobs behind the launch scripts: train the small Switch model, record routing traces,
train the learned predictor. Each takes the launch config tree (moe_jax/presets.py).
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

from moe_jax import data as data_lib
from moe_jax import distributed, predictor_training, runtime, training
from moe_jax.models import switch


def pydoc_windows(config, tokenizer, split: str) -> dict:
  """Encoder/decoder windows over the train or held-out pydoc topics."""
  train_topics, held_out = data_lib.split_topics()
  texts = list((train_topics if split == "train" else held_out).values())
  stream = data_lib.token_stream(texts, tokenizer)
  stride = int(config.train.stride) if split == "train" else None
  return data_lib.windows(stream, config.data.encoder_len, config.data.decoder_len, stride=stride)


def train_switch_on_pydoc(config, out_dir: str, *, force: bool = False) -> dict:
  """Trains tokenizer + model; saves both to `out_dir`; returns the summary stored with them."""
  from moe_jax.checkpoints import orbax_io  # pylint: disable=import-outside-toplevel
  model_cfg = runtime.switch_config(config)
  if os.path.exists(os.path.join(out_dir, orbax_io.MANIFEST_NAME)) and not force:
    raise runtime.UsageError(f"{out_dir} already holds a model; pass --force to retrain it.")
  if model_cfg.vocab_size != config.train.vocab_size:
    raise runtime.UsageError(f"config.model.vocab_size={model_cfg.vocab_size} must equal "
                             f"config.train.vocab_size={config.train.vocab_size}.")
  os.makedirs(out_dir, exist_ok=True)
  train_topics, _ = data_lib.split_topics()
  logging.info("training a %d-piece SentencePiece vocabulary on %d topics", model_cfg.vocab_size,
               len(train_topics))
  spiece = data_lib.train_tokenizer(list(train_topics.values()),
                                    os.path.join(out_dir, "spiece.model"),
                                    vocab_size=model_cfg.vocab_size)
  tokenizer = data_lib.load_tokenizer(spiece)
  train_data = pydoc_windows(config, tokenizer, "train")
  eval_data = pydoc_windows(config, tokenizer, "held_out")
  logging.info("%d train windows, %d held-out windows of %d+%d tokens",
               len(train_data["input_ids"]), len(eval_data["input_ids"]),
               config.data.encoder_len, config.data.decoder_len)
  # Training differentiates through the MoE layer: the dense backend (see moe_jax/training.py).
  moe_cfg = switch.moe_config_for(model_cfg, jnp.float32, dict(gmm_backend="dense"))
  start = time.time()
  params, history = training.train(
      model_cfg, train_data, moe_fn=switch.DefaultMoE(moe_cfg), steps=config.train.steps,
      batch_size=config.train.batch_size, learning_rate=config.train.learning_rate,
      warmup=config.train.warmup, weight_decay=config.train.weight_decay, seed=config.train.seed,
      log_every=config.train.log_every, eval_data=eval_data)
  skew = load_skew(model_cfg, params, eval_data, batch_size=config.data.batch_size)
  summary = {
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
      "data": "pydoc_data.topics (held out: every topic whose sha256(name) % 8 == 0)",
      "train_seconds": round(time.time() - start, 1),
      "final": history[-1], "history": history, "skew": skew,
  }
  if os.path.exists(os.path.join(out_dir, "params")):
    shutil.rmtree(os.path.join(out_dir, "params"))
  orbax_io.save_params(out_dir, params, config=model_cfg, metadata=summary, force=True)
  return summary


def load_skew(model_cfg, params, windows: dict, *, batch_size: int) -> dict:
  """Per sparse layer: tokens per expert on `windows`, and max/mean expert load."""
  model = switch.SwitchModel(model_cfg, jax.tree.map(jnp.asarray, params))
  counts = {}
  for batch in data_lib.batches(windows, batch_size):
    out = model(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"],
                output_router=True)
    for stack in ("encoder", "decoder"):
      for i, record in enumerate(getattr(out.router, stack)):
        key = f"{stack}/{i}"
        counts[key] = counts.get(key, 0) + np.asarray(record.stats.tokens_per_expert)
  return {key: {"tokens_per_expert": c.tolist(),
                "max_over_mean": float(c.max() / max(c.mean(), 1e-9))}
          for key, c in counts.items()}


def record_traces(config, model_cfg, params, windows: dict, *, num_batches: int) -> dict:
  """Routing traces (layer inputs + router probs per sparse layer) over `num_batches` batches."""
  moe_cfg = runtime.moe_config(config, model_cfg).replace(num_replica_slots=0)
  recorder = predictor_training.TraceRecorder(switch.DefaultMoE(moe_cfg))

  @jax.jit
  def record(params, batch):
    recorder.inputs, recorder.probs = {}, {}
    mask = jnp.ones_like(batch["input_ids"])
    switch.forward(params, model_cfg, batch["input_ids"], mask, batch["decoder_input_ids"],
                   moe_fn=recorder.moe_fn)
    return recorder.traces()

  traces = []
  for i, batch in enumerate(data_lib.batches(windows, config.data.batch_size, seed=1)):
    if i >= num_batches:
      break
    traces.append(jax.tree.map(np.asarray, record(params, batch)))
    logging.info("recorded routing traces of batch %d/%d", i + 1, num_batches)
  return predictor_training.concat_traces(traces)


def train_predictor(config, out_dir: str, *, force: bool = False) -> dict:
  """Records traces on the train split, trains the learned predictor, saves it to `out_dir`."""
  model_cfg, params, tokenizer = runtime.load_model(config)
  if tokenizer is None:
    raise runtime.UsageError(f"{config.checkpoint} has no spiece.model to tokenise pydoc text.")
  windows = pydoc_windows(config, tokenizer, "train")
  traces = record_traces(config, model_cfg, params, windows,
                         num_batches=config.train.predictor_batches)
  routers = {stack: [ff["router"] for ff in layers]
             for stack, layers in runtime.sparse_layers(params, model_cfg).items()}
  rank = int(config.train.predictor_rank) or None
  learned = predictor_training.train_learned(
      traces, routers, rank=rank, steps=config.train.predictor_steps,
      batch_size=512, learning_rate=3e-3, seed=config.train.seed)
  metadata = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "checkpoint": config.checkpoint, "rank": rank,
              "tokens": int(next(iter(traces.values()))[0][0].shape[0])}
  predictor_training.save_learned(out_dir, learned, metadata=metadata, force=force)
  return metadata


def load_switch_model(config, mesh):
  """(SwitchModel with config.moe, tokenizer or None) from config.checkpoint."""
  model_cfg, params, tokenizer = runtime.load_model(config, mesh=mesh)
  moe_overrides = dict(config.moe)
  return switch.SwitchModel(model_cfg, params, mesh=mesh, moe_overrides=moe_overrides), tokenizer


def pad_batch(rows: list[list[int]], multiple: int, pad_id: int):
  """(<int32>[B, L] ids, mask) right-padded; B rounded up to a multiple of the data axis."""
  length = max(len(r) for r in rows)
  batch = -(-len(rows) // multiple) * multiple
  ids = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  mask[len(rows):, 0] = 1   # filler rows: one visible pad token
  return jnp.asarray(ids), jnp.asarray(mask)


def balance_lines(config, model, input_ids, mask, mesh) -> list[str]:
  """Per encoder MoE layer: tokens per device and balancedness, none vs the configured predictor.

  In a multi-process job every process must call it (it runs the encoder); all get the lines.
  """
  from moe_jax import replication  # pylint: disable=import-outside-toplevel
  from moe_jax.models import switch_stack  # pylint: disable=import-outside-toplevel
  rcfg = runtime.replication_config(config)
  layers = runtime.sparse_layers(model.params, model.config)
  counts = {s: len(v) for s, v in layers.items()}
  lines = [f"per-layer balance of the encoder pass (mesh data={mesh.shape['data']} x "
           f"expert={mesh.shape['expert']}, r={model.moe_config.num_replica_slots}, "
           f"predictor={rcfg.predictor}):"]
  for name, kind in (("none", "none"), (rcfg.predictor, rcfg.predictor)):
    if kind in ("learned", "oracle", "dynamic"):
      lines.append(f"  ({kind}: see launch/bench.py for this policy)")
      continue
    runner = replication.StackRunner(replication.ReplicationConfig(predictor=kind),
                                     model.moe_config, mesh, layers,
                                     replication.init_state(counts, model.config.num_experts))
    jax.block_until_ready(switch_stack.encode(model.params, model.config, input_ids, mask,
                                              moe_fn=runner.moe_fn))
    stats = distributed.gather([(r.stats.tokens_per_device, r.stats.balancedness)
                                for r in runner.records()["encoder"]])
    for i, (per_device, balance) in enumerate(stats):
      lines.append(f"  {name:8s} encoder/{i}: tokens per device "
                   f"{per_device.reshape(-1).tolist()} balancedness {float(balance):.2f}")
  return lines
