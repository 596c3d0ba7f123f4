"""Decoder-only MoE language models from Hugging Face checkpoints, written once for every family.

A family (`moe_jax.models.qwen3_moe`, `mixtral`, `olmoe`) is a `DecoderConfig` subclass that reads
its config.json and pins what the family fixes, plus a `DecoderModel` subclass; the layers, the key
map (per-expert and fused checkpoint layouts), generation and the text task live here.

Modules: `config` (DecoderConfig, the params tree, HF config parsing), `keys` (the HF key map),
`layers` (RMSNorm, rotary embeddings, GQA attention, SwiGLU), `stack` (the decoder, KV cache,
the `moe_fn` hook call, HF's aux loss), `generate` (greedy decoding), `model` (DecoderModel,
forward), `task` (windows, batch forward, loss, prompt side, random params).
"""

from moe_jax.models.decoder.config import DecoderConfig, ExpertKeys, config_from_dict
from moe_jax.models.decoder.keys import hf_key_map
from moe_jax.models.decoder.model import (
    DecoderModel, DecoderOutput, check_params, forward, moe_config)
from moe_jax.models.decoder.stack import STACK, KVCache, MoELayerRouting
from moe_jax.models.decoder.task import (
    batch_tokens, forward_batch, generated_ids, init_params, loss, moe_layers, prompt_ids,
    prompt_pass, random_params, text_windows)

__all__ = [
    "STACK", "DecoderConfig", "DecoderModel", "DecoderOutput", "ExpertKeys", "KVCache",
    "MoELayerRouting", "batch_tokens", "check_params", "config_from_dict", "forward",
    "forward_batch", "generated_ids", "hf_key_map", "init_params", "loss", "moe_config",
    "moe_layers", "prompt_ids", "prompt_pass", "random_params", "text_windows",
]
