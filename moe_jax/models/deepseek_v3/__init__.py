"""The DeepSeek-V3 family (Hugging Face `deepseek_v3`): a decoder with multi-head latent
attention, sigmoid-routed (group-limited, bias-steered) SwiGLU experts, shared experts and leading
dense layers.

  from moe_jax.models import deepseek_v3
  model = deepseek_v3.from_pretrained("path/to/DeepSeek-V3", mesh=mesh)   # config + safetensors
  out = model(input_ids, attention_mask=am, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

The family interface is the one every family of `moe_jax.models` exposes (see
`moe_jax.models.switch`); everything but the config lives in `moe_jax.models.decoder`.
"""

from moe_jax.models import decoder
from moe_jax.models.decoder import interface
from moe_jax.models.decoder.interface import *  # noqa: F401,F403  (the shared interface)
from moe_jax.models.deepseek_v3.config import MODEL_TYPE, DeepseekV3Config


class DeepseekV3Model(decoder.DecoderModel):
  """A DeepSeek-V3 model (see `moe_jax.models.decoder.DecoderModel`)."""

  config_class = DeepseekV3Config


NAME = "deepseek_v3"
MODEL_TYPES = (MODEL_TYPE,)
Config = DeepseekV3Config
Model = DeepseekV3Model
from_pretrained = DeepseekV3Model.from_pretrained
config_from_dict = interface.config_for(DeepseekV3Config)

__all__ = interface.__all__ + interface.FAMILY_NAMES + ["DeepseekV3Config", "DeepseekV3Model"]
