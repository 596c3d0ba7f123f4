"""The GLM-4-MoE family (Hugging Face `glm4_moe`): a decoder with partial rotary
embeddings, q/k/v biases, optional q/k norm, DeepSeek-V3's sigmoid router, shared experts and
leading dense layers.

  from moe_jax.models import glm4_moe
  model = glm4_moe.from_pretrained("path/to/GLM-4.5-Air", mesh=mesh)   # config + safetensors
  out = model(input_ids, attention_mask=am, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

The family interface is the one every family of `moe_jax.models` exposes (see
`moe_jax.models.switch`); everything but the config lives in `moe_jax.models.decoder`.
"""

from moe_jax.models import decoder
from moe_jax.models.decoder import interface
from moe_jax.models.decoder.interface import *  # noqa: F401,F403  (the shared interface)
from moe_jax.models.glm4_moe.config import MODEL_TYPE, Glm4MoeConfig


class Glm4MoeModel(decoder.DecoderModel):
  """A GLM-4-MoE model (see `moe_jax.models.decoder.DecoderModel`)."""

  config_class = Glm4MoeConfig


NAME = "glm4_moe"
MODEL_TYPES = (MODEL_TYPE,)
Config = Glm4MoeConfig
Model = Glm4MoeModel
from_pretrained = Glm4MoeModel.from_pretrained
config_from_dict = interface.config_for(Glm4MoeConfig)

__all__ = interface.__all__ + interface.FAMILY_NAMES + ["Glm4MoeConfig", "Glm4MoeModel"]
