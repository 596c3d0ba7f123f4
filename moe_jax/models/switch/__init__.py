"""The Switch Transformer family (Hugging Face `switch_transformers`): T5 with top-1 MoE FFNs.

  from moe_jax.models import switch
  model = switch.from_pretrained("path/to/switch-base-8", mesh=mesh)    # config.json + safetensors
  out = model(input_ids, attention_mask=am, decoder_input_ids=dids, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

The family interface (the names every family of `moe_jax.models` exposes):
  MODEL_TYPES, NAME            config.json model types this family reads; its registry name
  Config, config_from_dict     the typed config (`from_hf_dict`, `from_hf_dir`, `to_hf_dict`);
                               the launch tree's `model` section -> Config
  Model, from_pretrained       the model bound to params, mesh and execution; HF dir -> Model
  moe_config, moe_layers       the MoE layer's MoEConfig; {stack: [sparse FFN params]} in order
  forward_batch, batch_tokens  teacher-forced logits of a batch dict; its token count
  token_embeddings             {stack: (embedding output, mask)} of a batch dict (seed predictor)
  text_windows, loss           token stream -> batch dicts; (loss, metrics) for training
  prompt_pass                  the MoE layers' pass over a prompt (Switch: the encoder)
  prompt_ids, generated_ids    text -> prompt ids; a generated row -> its new ids
  init_params, random_params   numpy params for training from scratch / tests and benchmarks
  hf_key_map                   the `moe_jax.checkpoints.layout.KeyMap` of a Config

Modules: `config` (SwitchConfig, the params tree), `layers` (T5 layers), `stack` (encoder and
decoder stacks, the `moe_fn` hook call), `generate` (greedy decoding), `model` (SwitchModel,
forward), `keys` (HF key map), `synthetic` (random params), `task` (windows, batch forward, loss).
"""

from moe_jax.models.switch.config import MODEL_TYPE, SwitchConfig, sparse_block_indices
from moe_jax.models.switch.keys import hf_key_map
from moe_jax.models.switch.model import (
    RouterOutput, SwitchModel, SwitchOutput, check_params, config_from_dict, forward,
    from_pretrained, moe_config, shift_right)
from moe_jax.models.switch.stack import STACKS, SparseLayerRouting, moe_layers
from moe_jax.models.switch.synthetic import random_params
from moe_jax.models.switch.task import (
    batch_tokens, forward_batch, generated_ids, init_params, loss, prompt_ids, prompt_pass,
    text_windows, token_embeddings)

NAME = "switch"
PADDING_SIDE = "right"       # encoder prompts are right-padded (masked)
MODEL_TYPES = (MODEL_TYPE,)
Config = SwitchConfig
Model = SwitchModel

__all__ = [
    "MODEL_TYPES", "NAME", "PADDING_SIDE", "STACKS", "Config", "Model", "RouterOutput",
    "SparseLayerRouting", "SwitchConfig", "SwitchModel", "SwitchOutput", "batch_tokens",
    "check_params", "config_from_dict", "forward", "forward_batch", "from_pretrained",
    "generated_ids", "hf_key_map", "init_params", "loss", "moe_config", "moe_layers", "prompt_ids",
    "prompt_pass", "random_params", "shift_right", "sparse_block_indices", "text_windows",
    "token_embeddings",
]
