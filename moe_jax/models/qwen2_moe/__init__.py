"""The Qwen2-MoE family (Hugging Face `qwen2_moe`): a decoder with q/k/v biases, top-k
softmax-routed SwiGLU experts and a sigmoid-gated shared expert.

  from moe_jax.models import qwen2_moe
  model = qwen2_moe.from_pretrained("path/to/Qwen1.5-MoE-A2.7B", mesh=mesh)   # config + safetensors
  out = model(input_ids, attention_mask=am, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

The family interface is the one every family of `moe_jax.models` exposes (see
`moe_jax.models.switch`); everything but the config lives in `moe_jax.models.decoder`.
"""

from moe_jax.models import decoder
from moe_jax.models.decoder import interface
from moe_jax.models.decoder.interface import *  # noqa: F401,F403  (the shared interface)
from moe_jax.models.qwen2_moe.config import MODEL_TYPE, Qwen2MoeConfig


class Qwen2MoeModel(decoder.DecoderModel):
  """A Qwen2-MoE model (see `moe_jax.models.decoder.DecoderModel`)."""

  config_class = Qwen2MoeConfig


NAME = "qwen2_moe"
MODEL_TYPES = (MODEL_TYPE,)
Config = Qwen2MoeConfig
Model = Qwen2MoeModel
from_pretrained = Qwen2MoeModel.from_pretrained
config_from_dict = interface.config_for(Qwen2MoeConfig)

__all__ = interface.__all__ + interface.FAMILY_NAMES + ["Qwen2MoeConfig", "Qwen2MoeModel"]
