"""The OLMoE family (Hugging Face `olmoe`): a decoder with full-width q/k norm (and optional
q/k/v clipping) whose every layer routes each token to its top-k SwiGLU experts.

  from moe_jax.models import olmoe
  model = olmoe.from_pretrained("path/to/OLMoE-1B-7B-0924", mesh=mesh)   # config + safetensors
  out = model(input_ids, attention_mask=am, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

The family interface is the one every family of `moe_jax.models` exposes (see
`moe_jax.models.switch`); everything but the config lives in `moe_jax.models.decoder`.
"""

from moe_jax.models import decoder
from moe_jax.models.decoder import interface
from moe_jax.models.decoder.interface import *  # noqa: F401,F403  (the shared interface)
from moe_jax.models.olmoe.config import MODEL_TYPE, OlmoeConfig


class OlmoeModel(decoder.DecoderModel):
  """An OLMoE model (see `moe_jax.models.decoder.DecoderModel`)."""

  config_class = OlmoeConfig


NAME = "olmoe"
MODEL_TYPES = (MODEL_TYPE,)
Config = OlmoeConfig
Model = OlmoeModel
from_pretrained = OlmoeModel.from_pretrained
config_from_dict = interface.config_for(OlmoeConfig)

__all__ = interface.__all__ + interface.FAMILY_NAMES + ["OlmoeConfig", "OlmoeModel"]
