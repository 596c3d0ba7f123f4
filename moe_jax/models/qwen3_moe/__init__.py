"""The Qwen3-MoE family (Hugging Face `qwen3_moe`): a decoder with per-head q/k norm and top-k
softmax-routed SwiGLU experts.

  from moe_jax.models import qwen3_moe
  model = qwen3_moe.from_pretrained("path/to/Qwen3-30B-A3B", mesh=mesh)   # config + safetensors
  out = model(input_ids, attention_mask=am, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

The family interface is the one every family of `moe_jax.models` exposes (see
`moe_jax.models.switch`); everything but the config lives in `moe_jax.models.decoder`.
"""

from moe_jax.models import decoder
from moe_jax.models.decoder import interface
from moe_jax.models.decoder.interface import *  # noqa: F401,F403  (the shared interface)
from moe_jax.models.qwen3_moe.config import MODEL_TYPE, Qwen3MoeConfig


class Qwen3MoeModel(decoder.DecoderModel):
  """A Qwen3-MoE model (see `moe_jax.models.decoder.DecoderModel`)."""

  config_class = Qwen3MoeConfig


NAME = "qwen3_moe"
MODEL_TYPES = (MODEL_TYPE,)
Config = Qwen3MoeConfig
Model = Qwen3MoeModel
from_pretrained = Qwen3MoeModel.from_pretrained
config_from_dict = interface.config_for(Qwen3MoeConfig)

__all__ = interface.__all__ + interface.FAMILY_NAMES + ["Qwen3MoeConfig", "Qwen3MoeModel"]
