"""Config trees for the launch scripts (ml_collections), shared by the files in configs/.

Launch scripts turn the tree into typed objects once, at the boundary (`app.config.from_tree`);
nothing below them sees the tree. `named(name)` is the tree of configs/<name>.py: switch_tiny,
switch_base_<E>, or a decoder-only model of `DECODERS` (family + its Config fields).

  config.model         family: the model family's name (`moe_jax.models`, e.g. "switch"); the
                       other fields are the family's Config fields (HF config.json names)
  config.checkpoint    a checkpoint dir: moe_jax orbax (moe_jax.json + params/) or Hugging Face
                       (config.json + *.safetensors); "builtin:NAME" = moe_jax/assets/NAME
  config.execution     ExecutionConfig fields of the MoE layers (capacity_mode, capacity_factor,
                       gmm_backend, all_to_all, num_chunks)
  config.replication   ReplicationConfig fields (predictor, num_replica_slots, first_layer,
                       history_decay, resident, stickiness, route_by, eplb_refresh,
                       devices_per_node)
  config.predictor_checkpoint  the learned predictor (orbax dir), "" if none
  config.seed_predictor_checkpoint  the seed predictor (orbax dir), "" if none
  config.mesh          data / expert axis sizes (expert=-1: all devices / data); a mesh must use
                       every device unless allow_idle_devices=True
  config.cpu_devices   simulated CPU devices when the host has one (0: leave XLA alone)
  config.data          batch_size, num_batches, and the keyword arguments of the family's
                       `text_windows` (Switch: encoder_len, decoder_len; decoder-only families:
                       length); max_input_tokens: the longest prompt launch/infer.py accepts
                       (memory grows with its square)
  config.train         training knobs (launch/train.py, launch/train_predictor.py; gmm_backend:
                       the MoE layers' grouped matmul in training; replication: none, history
                       or pregate, replicas placed every train step)
  config.bench         benchmark knobs (launch/bench.py; decode_steps: greedy steps of the
                       decode phase of decoder-only families, 0: prefill only)
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from moe_jax import models

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

SWITCH_WINDOW = dict(encoder_len=64, decoder_len=64)   # read 64 tokens, predict the next 64
DECODER_WINDOW = dict(length=128)                       # next-token windows of 128 tokens

# Decoder-only models: the Config fields of the family (HF config.json names), the rest being the
# family's defaults. Tiny ones are random shapes a CPU runs in seconds, with the ids of the
# SentencePiece vocabulary launch/train.py trains (pad 0, eos 1, no bos). Released ones are the
# checkpoint's config.json with its generation_config.json's bos / eos / pad ids (a checkpoint's
# own config wins when it is loaded; these give the shapes to configs and benchmarks).
DECODER_TINY = dict(
    vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=2,
    bos_token_id=None, eos_token_id=(1,), pad_token_id=0, max_position_embeddings=4096)

# The small Qwen3-MoE trained on pydoc text that ships in moe_jax/assets/qwen3_moe_small (README):
# every layer MoE; 32 fine-grained experts of width 32 (narrower than hidden, as Qwen3's), top-2
# renormalised (norm_topk_prob, as Qwen3 ships); GQA 4:2 heads of 16 with per-head q/k norm.
# (16 experts of width 64, the same training FLOPs, reached held-out CE 5.22 instead of 5.04 and
# max/mean expert loads of 1.5-3.6 instead of 2.1-4.5.) Untied embeddings, as every released
# Qwen3-MoE: the family's from-scratch init draws the embedding N(0, 1), which as a tied head
# gives logits of std sqrt(64) = 8 (initial CE ~30); a separate head starts near log(2048).
QWEN3_MOE_SMALL = dict(
    vocab_size=2048, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=32, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=(), rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=(1,), pad_token_id=0, router_aux_loss_coef=0.001,
    max_position_embeddings=4096)

QWEN3_MOE_30B_A3B = dict(      # Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=(), rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=(151645, 151643), pad_token_id=151643,
    router_aux_loss_coef=0.001, max_position_embeddings=40960)

MIXTRAL_8X7B = dict(           # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, num_experts=8, num_experts_per_tok=2,
    rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=(2,), pad_token_id=None, router_aux_loss_coef=0.02,
    max_position_embeddings=32768)

OLMOE_1B_7B = dict(            # allenai/OLMoE-1B-7B-0924: 6.9B parameters, 1.3B active
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=False, clip_qkv=None, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=(50279,), pad_token_id=1,
    router_aux_loss_coef=0.01, max_position_embeddings=4096)

QWEN1_5_MOE_A2_7B = dict(     # Qwen/Qwen1.5-MoE-A2.7B (qwen2_moe): 14.3B parameters, 2.7B active
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
    decoder_sparse_step=1, mlp_only_layers=(), qkv_bias=True, rms_norm_eps=1e-6,
    rope_theta=1e6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=(151643,),
    pad_token_id=None, router_aux_loss_coef=0.001, max_position_embeddings=8192)

DEEPSEEK_V3 = dict(            # deepseek-ai/DeepSeek-V3: 671B parameters, 37B active
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, num_experts=256,
    num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3, n_group=8,
    topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    rope_interleave=True, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=(1,), pad_token_id=None, max_position_embeddings=163840)

GLM4_5_AIR = dict(             # zai-org/GLM-4.5-Air (glm4_moe): 106B parameters, 12B active
    vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
    num_experts=128, num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1,
    n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
    attention_bias=True, use_qk_norm=False, partial_rotary_factor=0.5, rms_norm_eps=1e-5,
    rope_theta=1e6, tie_word_embeddings=False, bos_token_id=None,
    eos_token_id=(151329, 151336, 151338), pad_token_id=151329, max_position_embeddings=131072)

# configs/<name>.py -> (family, Config fields). A new model is one line here plus a copy of
# configs/qwen3_moe_tiny.py naming it.
DECODERS = {
    "qwen3_moe_tiny": ("qwen3_moe", dict(DECODER_TINY, moe_intermediate_size=32, head_dim=16)),
    "mixtral_tiny": ("mixtral", DECODER_TINY),
    "olmoe_tiny": ("olmoe", DECODER_TINY),
    "qwen2_moe_tiny": ("qwen2_moe", dict(DECODER_TINY, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64)),
    "deepseek_v3_tiny": ("deepseek_v3", dict(
        DECODER_TINY, moe_intermediate_size=32, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4)),
    "glm4_moe_tiny": ("glm4_moe", dict(DECODER_TINY, moe_intermediate_size=32, head_dim=16,
                                       attention_bias=True, use_qk_norm=True)),
    "qwen3_moe_small": ("qwen3_moe", QWEN3_MOE_SMALL),      # shipped: `qwen3_moe_small()`
    "qwen3_moe_30b_a3b": ("qwen3_moe", QWEN3_MOE_30B_A3B),
    "mixtral_8x7b": ("mixtral", MIXTRAL_8X7B),
    "olmoe_1b_7b": ("olmoe", OLMOE_1B_7B),
    "qwen1_5_moe_a2_7b": ("qwen2_moe", QWEN1_5_MOE_A2_7B),
    "deepseek_v3": ("deepseek_v3", DEEPSEEK_V3),
    "glm4_5_air": ("glm4_moe", GLM4_5_AIR),
}


def resolve_checkpoint(path: str) -> str:
  """'builtin:NAME' -> the packaged asset dir; anything else unchanged."""
  if path.startswith(BUILTIN):
    return os.path.join(ASSETS, path[len(BUILTIN):])
  return path


def common(family: str, model: dict, *, window: dict, checkpoint: str = ""
           ) -> ml_collections.ConfigDict:
  """The full tree with defaults; `model` holds the family's Config fields, `window` the keyword
  arguments of its `text_windows` (config.data)."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(family=family, **model))
  c.checkpoint = checkpoint
  c.execution = ml_collections.ConfigDict(dict(
      capacity_mode="dropless", capacity_factor=1.25, gmm_backend="auto", all_to_all="auto",
      num_chunks=1))
  c.replication = ml_collections.ConfigDict(dict(
      predictor="pregate", num_replica_slots=2, first_layer="history", history_decay=0.8,
      resident=False, stickiness=0.0, eplb_refresh=4, devices_per_node=_overridable(None)))
  c.predictor_checkpoint = ""
  c.seed_predictor_checkpoint = ""
  c.mesh = ml_collections.ConfigDict(dict(data=1, expert=-1, allow_idle_devices=False))
  c.cpu_devices = 8
  # max_input_tokens: launch/infer.py on the shipped model peaks at ~2 GB RSS at 4096 (README).
  c.data = ml_collections.ConfigDict(dict(window, batch_size=8, num_batches=4,
                                          max_input_tokens=4096))
  c.train = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=16, learning_rate=3e-3, warmup=100, weight_decay=0.01,
      vocab_size=2048, stride=32, log_every=50, eval_every=0, seed=0, out_dir="",
      gmm_backend="auto", replication="none", predictor_steps=1500, predictor_rank=0,
      predictor_batches=64))
  c.bench = ml_collections.ConfigDict(dict(
      policies="none,history,pregate,learned,learned_load,seed,hybrid,eplb,reactive,oracle",
      capacity_modes="dropless,capacity", repeats=3, warmup_batches=2, report_dir="reports/bench",
      plots=True, decode_steps=16, approximate=True, eplb_counts=""))
  c.seed = 0
  return c


def switch_base(num_experts: int) -> ml_collections.ConfigDict:
  """A released google/switch-base-{num_experts}; point config.checkpoint at the downloaded dir."""
  c = common("switch", dict(SWITCH_BASE, num_experts=num_experts), window=SWITCH_WINDOW)
  c.data.batch_size = 8
  c.data.num_batches = 2
  c.data.max_input_tokens = 512    # the input length the released Switch models were trained on
  return c


def switch_tiny() -> ml_collections.ConfigDict:
  """The small Switch model trained on pydoc text that ships in moe_jax/assets/switch_tiny."""
  c = common("switch", dict(SWITCH_TINY), window=SWITCH_WINDOW,
             checkpoint=BUILTIN + "switch_tiny")
  c.predictor_checkpoint = BUILTIN + "switch_tiny/predictor"
  c.seed_predictor_checkpoint = BUILTIN + "switch_tiny/seed_predictor"
  return c


def decoder(family: str, model: dict, *, checkpoint: str = "") -> ml_collections.ConfigDict:
  """A decoder-only family's tree: config.model holds every field of its Config (`model`'s values,
  the family's defaults for the rest, so each is a --config.model.* flag); data windows of
  `length` tokens (`text_windows(stream, length, stride)`)."""
  fields = dict(config_defaults(family), **model)
  fields = {key: _overridable(value) for key, value in fields.items()}
  return common(family, fields, window=DECODER_WINDOW, checkpoint=checkpoint)


def qwen3_moe_small() -> ml_collections.ConfigDict:
  """The small Qwen3-MoE trained on pydoc text that ships in moe_jax/assets/qwen3_moe_small, with
  the train settings that made it (launch/train.py)."""
  c = decoder(*DECODERS["qwen3_moe_small"], checkpoint=BUILTIN + "qwen3_moe_small")
  c.predictor_checkpoint = BUILTIN + "qwen3_moe_small/predictor"
  c.seed_predictor_checkpoint = BUILTIN + "qwen3_moe_small/seed_predictor"
  c.train.update(dict(steps=1500, batch_size=8, learning_rate=3e-3, warmup=100))
  return c


def config_defaults(family: str) -> dict:
  """{field: default} of the family's Config dataclass (ValueError for an unknown family)."""
  defaults = {}
  for field in dataclasses.fields(models.get_family(family).Config):
    if field.default is not dataclasses.MISSING:
      defaults[field.name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      defaults[field.name] = field.default_factory()
  return defaults


def _overridable(value):
  """`value`, or for None a placeholder --config.model.KEY=LITERAL can set (config_flags refuses
  to override a plain None field)."""
  if value is None:
    return ml_collections.config_dict.placeholder(object)
  return value


def named(name: str) -> ml_collections.ConfigDict:
  """The tree of configs/<name>.py: switch_tiny, switch_base_<E> or a name of `DECODERS`."""
  if name in SHIPPED:
    return SHIPPED[name]()
  suffix = name[len("switch_base_"):]
  if name.startswith("switch_base_") and suffix.isdigit():
    return switch_base(int(suffix))
  if name not in DECODERS:
    raise ValueError(f"no preset named {name!r}; use switch_tiny, switch_base_<E> or one of "
                     f"{', '.join(DECODERS)}.")
  return decoder(*DECODERS[name])


# Presets with a packaged checkpoint (and the train settings that made it).
SHIPPED = {"switch_tiny": switch_tiny, "qwen3_moe_small": qwen3_moe_small}
