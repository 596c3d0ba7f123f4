"""The family-interface names every decoder-only family shares; each family re-exports them
(`from moe_jax.models.decoder.interface import *`) and defines its own `FAMILY_NAMES`: `NAME`,
`MODEL_TYPES`, `Config`, `Model`, `from_pretrained` and `config_from_dict` (`config_for`)."""

import functools

from moe_jax.models.decoder.config import config_from_dict as _config_from_dict
from moe_jax.models.decoder.keys import hf_key_map
from moe_jax.models.decoder.model import moe_config
from moe_jax.models.decoder.task import (
    batch_tokens, forward_batch, generated_ids, init_params, loss, moe_layers, prompt_ids,
    prompt_pass, random_params, text_windows, token_embeddings)

PADDING_SIDE = "left"        # generate takes left-padded prompts

__all__ = [
    "PADDING_SIDE", "batch_tokens", "forward_batch", "generated_ids", "hf_key_map",
    "init_params", "loss", "moe_config", "moe_layers", "prompt_ids", "prompt_pass",
    "random_params", "text_windows", "token_embeddings",
]


def config_for(config_class):
  """The family's `config_from_dict`: the launch tree's `model` section -> `config_class`."""
  return functools.partial(_config_from_dict, config_class)


FAMILY_NAMES = ["NAME", "MODEL_TYPES", "Config", "Model", "from_pretrained", "config_from_dict"]
