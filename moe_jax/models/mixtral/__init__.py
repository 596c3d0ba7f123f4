"""The Mixtral family (Hugging Face `mixtral`): a GQA decoder whose every layer routes each token
to its top-k SwiGLU experts (softmax over all experts, then renormalised).

  from moe_jax.models import mixtral
  model = mixtral.from_pretrained("path/to/Mixtral-8x7B-v0.1", mesh=mesh)   # config + safetensors
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
from moe_jax.models.mixtral.config import MODEL_TYPE, MixtralConfig


class MixtralModel(decoder.DecoderModel):
  """A Mixtral model (see `moe_jax.models.decoder.DecoderModel`)."""

  config_class = MixtralConfig


NAME = "mixtral"
PADDING_SIDE = "left"        # generate takes left-padded prompts
MODEL_TYPES = (MODEL_TYPE,)
Config = MixtralConfig
Model = MixtralModel
from_pretrained = MixtralModel.from_pretrained
config_from_dict = functools.partial(decoder.config_from_dict, MixtralConfig)

__all__ = [
    "MODEL_TYPES", "NAME", "PADDING_SIDE", "Config", "MixtralConfig", "MixtralModel", "Model",
    "batch_tokens", "config_from_dict", "forward_batch", "from_pretrained", "generated_ids",
    "hf_key_map", "init_params", "loss", "moe_config", "moe_layers", "prompt_ids", "prompt_pass",
    "random_params", "text_windows",
]
