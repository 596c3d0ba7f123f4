"""The OLMoE family (Hugging Face `olmoe`): a decoder with full-width q/k norm (and optional
q/k/v clipping) whose every layer routes each token to its top-k SwiGLU experts.

  from moe_jax.models import olmoe
  model = olmoe.from_pretrained("path/to/OLMoE-1B-7B-0924", mesh=mesh)   # config + safetensors
  out = model(input_ids, attention_mask=am, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

The family interface is the one every family of `moe_jax.models` exposes (see
`moe_jax.models.switch`); everything but the config lives in `moe_jax.models.decoder`.
"""

import functools

from moe_jax.models import decoder
from moe_jax.models.decoder import (
    batch_tokens, forward_batch, generated_ids, hf_key_map, init_params, loss, moe_config,
    moe_layers, prompt_ids, prompt_pass, random_params, text_windows)
from moe_jax.models.olmoe.config import MODEL_TYPE, OlmoeConfig


class OlmoeModel(decoder.DecoderModel):
  """An OLMoE model (see `moe_jax.models.decoder.DecoderModel`)."""

  config_class = OlmoeConfig


NAME = "olmoe"
PADDING_SIDE = "left"        # generate takes left-padded prompts
MODEL_TYPES = (MODEL_TYPE,)
Config = OlmoeConfig
Model = OlmoeModel
from_pretrained = OlmoeModel.from_pretrained
config_from_dict = functools.partial(decoder.config_from_dict, OlmoeConfig)

__all__ = [
    "MODEL_TYPES", "NAME", "PADDING_SIDE", "Config", "Model", "OlmoeConfig", "OlmoeModel",
    "batch_tokens", "config_from_dict", "forward_batch", "from_pretrained", "generated_ids",
    "hf_key_map", "init_params", "loss", "moe_config", "moe_layers", "prompt_ids", "prompt_pass",
    "random_params", "text_windows",
]
