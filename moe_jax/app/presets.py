"""Config trees for the launch scripts (ml_collections), shared by the files in configs/.

Launch scripts turn the tree into typed objects once, at the boundary (`app.config.from_tree`);
nothing below them sees the tree.

  config.model         family: the model family's name (`moe_jax.models`, e.g. "switch"); the
                       other fields are the family's Config fields (HF config.json names)
  config.checkpoint    a checkpoint dir: moe_jax orbax (moe_jax.json + params/) or Hugging Face
                       (config.json + *.safetensors); "builtin:NAME" = moe_jax/assets/NAME
  config.execution     ExecutionConfig fields of the MoE layers (capacity_mode, capacity_factor,
                       gmm_backend, all_to_all, num_chunks)
  config.replication   ReplicationConfig fields (predictor, num_replica_slots, first_layer,
                       history_decay, resident, stickiness)
  config.predictor_checkpoint  the learned predictor (orbax dir), "" if none
  config.mesh          data / expert axis sizes (expert=-1: all devices / data); a mesh must use
                       every device unless allow_idle_devices=True
  config.cpu_devices   simulated CPU devices when the host has one (0: leave XLA alone)
  config.data          batch_size, num_batches, and the family's window lengths (Switch:
                       encoder_len, decoder_len); max_input_tokens: the longest prompt
                       launch/infer.py accepts (memory grows with its square)
  config.train         training knobs (launch/train.py, launch/train_predictor.py)
  config.bench         benchmark knobs (launch/bench.py)
"""

from __future__ import annotations

import os

import ml_collections

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BUILTIN = "builtin:"

SWITCH_BASE = dict(
    vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12,
    num_layers=12, num_decoder_layers=12,
    num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
    encoder_sparse_step=2, decoder_sparse_step=2,        # sparse blocks 1, 3, ..., 11
    expert_capacity=64,                                   # per sequence and expert (HF)
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, router_z_loss_coef=0.001, router_aux_loss_coef=0.001,
    tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    dense_act_fn="relu")

SWITCH_TINY = dict(
    vocab_size=2048, d_model=64, d_kv=16, d_ff=128, num_heads=4,
    num_layers=6, num_decoder_layers=6,
    num_sparse_encoder_layers=3, num_sparse_decoder_layers=3,
    encoder_sparse_step=2, decoder_sparse_step=2,        # sparse blocks 1, 3, 5
    num_experts=16, expert_capacity=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, router_z_loss_coef=0.001, router_aux_loss_coef=0.001,
    tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    dense_act_fn="relu")


def resolve_checkpoint(path: str) -> str:
  """'builtin:NAME' -> the packaged asset dir; anything else unchanged."""
  if path.startswith(BUILTIN):
    return os.path.join(ASSETS, path[len(BUILTIN):])
  return path


def common(family: str, model: dict, *, checkpoint: str = "") -> ml_collections.ConfigDict:
  """The full tree with defaults; `model` holds the family's Config fields."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(family=family, **model))
  c.checkpoint = checkpoint
  c.execution = ml_collections.ConfigDict(dict(
      capacity_mode="dropless", capacity_factor=1.25, gmm_backend="auto", all_to_all="auto",
      num_chunks=1))
  c.replication = ml_collections.ConfigDict(dict(
      predictor="pregate", num_replica_slots=2, first_layer="history", history_decay=0.8,
      resident=False, stickiness=0.0))
  c.predictor_checkpoint = ""
  c.mesh = ml_collections.ConfigDict(dict(data=1, expert=-1, allow_idle_devices=False))
  c.cpu_devices = 8
  # max_input_tokens: launch/infer.py on the shipped model peaks at ~2 GB RSS at 4096 (README).
  c.data = ml_collections.ConfigDict(dict(encoder_len=64, decoder_len=64, batch_size=8,
                                          num_batches=4, max_input_tokens=4096))
  c.train = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=16, learning_rate=3e-3, warmup=100, weight_decay=0.01,
      vocab_size=2048, stride=32, log_every=50, seed=0, out_dir="",
      predictor_steps=1500, predictor_rank=0, predictor_batches=64))
  c.bench = ml_collections.ConfigDict(dict(
      policies="none,history,pregate,learned,oracle", capacity_modes="dropless,capacity",
      repeats=3, warmup_batches=2, report_dir="reports/bench", plots=True))
  c.seed = 0
  return c


def switch_base(num_experts: int) -> ml_collections.ConfigDict:
  """A released google/switch-base-{num_experts}; point config.checkpoint at the downloaded dir."""
  c = common("switch", dict(SWITCH_BASE, num_experts=num_experts))
  c.data.batch_size = 8
  c.data.num_batches = 2
  c.data.max_input_tokens = 512    # the input length the released Switch models were trained on
  return c


def switch_tiny() -> ml_collections.ConfigDict:
  """The small Switch model trained on pydoc text that ships in moe_jax/assets/switch_tiny."""
  c = common("switch", dict(SWITCH_TINY), checkpoint=BUILTIN + "switch_tiny")
  c.predictor_checkpoint = BUILTIN + "switch_tiny/predictor"
  return c
