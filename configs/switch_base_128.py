"""google/switch-base-128: the released Switch Transformer base with 128 experts per sparse block.

  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/switch_base_128.py", lock_config=True)
  model_config = moe_jax.models.switch.config_from_dict(FLAGS.config.model)

`model` holds the SwitchConfig fields of the released checkpoint (its config.json), `moe` the MoE
layer settings, `mesh` the ('data', 'expert') mesh (expert=-1: all devices / data).
"""

import ml_collections


def get_config(arg=None):
  """Returns the switch-base-128 config. `arg` is unused (kept for config_flags' "file:arg")."""
  del arg
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12,
      num_layers=12, num_decoder_layers=12,
      num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
      encoder_sparse_step=2, decoder_sparse_step=2,        # sparse blocks 1, 3, ..., 11
      num_experts=128, expert_capacity=64,                  # per sequence and expert
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      layer_norm_epsilon=1e-6, router_z_loss_coef=0.001, router_aux_loss_coef=0.001,
      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
      dense_act_fn="relu"))
  config.moe = ml_collections.ConfigDict(dict(
      dispatch="dropless", num_replica_slots=0, gmm_backend="auto", all_to_all="auto",
      predictor="none"))
  config.mesh = ml_collections.ConfigDict(dict(data=1, expert=-1))
  return config
