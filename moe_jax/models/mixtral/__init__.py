"""The Mixtral family (Hugging Face `mixtral`): a GQA decoder whose every layer routes each token
to its top-k SwiGLU experts (softmax over all experts, then renormalised).

  from moe_jax.models import mixtral
  model = mixtral.from_pretrained("path/to/Mixtral-8x7B-v0.1", mesh=mesh)   # config + safetensors
  out = model(input_ids, attention_mask=am, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

The family interface is the one every family of `moe_jax.models` exposes (see
`moe_jax.models.switch`); everything but the config lives in `moe_jax.models.decoder`.
"""

from moe_jax.models import decoder
from moe_jax.models.decoder import interface
from moe_jax.models.decoder.interface import *  # noqa: F401,F403  (the shared interface)
from moe_jax.models.mixtral.config import MODEL_TYPE, MixtralConfig


class MixtralModel(decoder.DecoderModel):
  """A Mixtral model (see `moe_jax.models.decoder.DecoderModel`)."""

  config_class = MixtralConfig


NAME = "mixtral"
MODEL_TYPES = (MODEL_TYPE,)
Config = MixtralConfig
Model = MixtralModel
from_pretrained = MixtralModel.from_pretrained
config_from_dict = interface.config_for(MixtralConfig)

__all__ = interface.__all__ + interface.FAMILY_NAMES + ["MixtralConfig", "MixtralModel"]
