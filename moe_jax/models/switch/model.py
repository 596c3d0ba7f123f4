"""Switch Transformer (T5 encoder-decoder with top-1 MoE FFNs) in pure JAX, matching Hugging Face.

  from moe_jax.models import switch
  model = switch.from_pretrained("path/to/google-switch-base-8", mesh=mesh)
  out = model(input_ids, attention_mask=am, decoder_input_ids=dids, output_router=True)
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)

Every sparse FFN runs through the library's MoE layer (`moe_jax.moe_apply`) behind one hook,
`moe_fn(stack, sparse_index, ff_params, x_normed, routing)` (see `stack.py`). The stacks are in
`stack.py`, the T5 layers in `layers.py`, greedy decoding in `generate.py`; this module binds them
to params, a mesh, the layer's `MoEConfig` and an `ExecutionConfig`, and jits them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import mesh as mesh_lib
from moe_jax.config import ExecutionConfig, MoEConfig
from moe_jax.models.switch import generate as switch_generate
from moe_jax.models.switch import stack as switch_stack
from moe_jax.models.switch.config import SwitchConfig
from moe_jax.models.switch.keys import hf_key_map
from moe_jax.models.switch.stack import SparseLayerRouting
from moe_jax.moe_fn import DefaultMoE, MoEFn

__all__ = [
    "RouterOutput", "SparseLayerRouting", "SwitchConfig", "SwitchModel", "SwitchOutput",
    "check_params", "config_from_dict", "forward", "from_pretrained", "moe_config", "shift_right",
]


class _CheckpointEos:
  """The default of `SwitchModel.generate(eos_token_id=...)`: the checkpoint's own eos."""

  def __repr__(self):
    return "<the checkpoint's eos>"


_CHECKPOINT_EOS = _CheckpointEos()


@struct.dataclass
class RouterOutput:
  """Per sparse block routing of both stacks, and HF's router losses per stack.

  Attributes:
    encoder, decoder: one `SparseLayerRouting` per sparse block, in block order.
    encoder_z_loss, encoder_aux_loss, decoder_z_loss, decoder_aux_loss: <f32>[] as HF's
      `Seq2SeqMoEOutput` (0 for a stack whose sparse step is <= 1).
  """

  encoder: tuple
  decoder: tuple
  encoder_z_loss: jax.Array
  encoder_aux_loss: jax.Array
  decoder_z_loss: jax.Array
  decoder_aux_loss: jax.Array


@struct.dataclass
class SwitchOutput:
  """Model outputs.

  Attributes:
    logits: <f32>[B, Ld, V].
    encoder_last_hidden_state: <f>[B, Ls, d] after the encoder's final norm.
    decoder_last_hidden_state: <f>[B, Ld, d] after the decoder's final norm (before the head's
      rescale).
    router: a `RouterOutput` when asked for (`output_router=True`), else None.
  """

  logits: jax.Array
  encoder_last_hidden_state: jax.Array
  decoder_last_hidden_state: jax.Array
  router: RouterOutput | None = None


def forward(params: dict, cfg: SwitchConfig, input_ids: jax.Array, attention_mask: jax.Array,
            decoder_input_ids: jax.Array, *, moe_fn: MoEFn,
            decoder_attention_mask: jax.Array | None = None) -> SwitchOutput:
  """Teacher-forced encoder-decoder forward (pure; not jitted).

  Args:
    params: the Switch params tree (see `config.py`).
    cfg: its `SwitchConfig`.
    input_ids: <int32>[B, Ls]; attention_mask: <int or bool>[B, Ls] (0 = padding).
    decoder_input_ids: <int32>[B, Ld], starting with `decoder_start_token_id` (see `shift_right`).
    moe_fn: the sparse-FFN hook, e.g. `moe_jax.moe_fn.DefaultMoE(moe_config, mesh=mesh)`.
    decoder_attention_mask: optional <int or bool>[B, Ld] padding mask of the decoder keys.

  Returns:
    A `SwitchOutput` with `router` filled.
  """
  encoder_hidden, encoder_records = switch_stack.encode(params, cfg, input_ids, attention_mask,
                                                        moe_fn=moe_fn)
  cache = switch_stack.init_decoder_cache(params, cfg, encoder_hidden, decoder_input_ids.shape[1])
  decoder_hidden, _, decoder_records = switch_stack.decode(
      params, cfg, decoder_input_ids, cache, attention_mask, moe_fn=moe_fn,
      decoder_key_mask=decoder_attention_mask)
  encoder_z, encoder_aux = switch_stack.stack_router_losses(encoder_records, cfg.encoder_step)
  decoder_z, decoder_aux = switch_stack.stack_router_losses(decoder_records, cfg.decoder_step)
  router = RouterOutput(encoder=encoder_records, decoder=decoder_records,
                        encoder_z_loss=encoder_z, encoder_aux_loss=encoder_aux,
                        decoder_z_loss=decoder_z, decoder_aux_loss=decoder_aux)
  return SwitchOutput(logits=switch_stack.lm_logits(params, cfg, decoder_hidden),
                      encoder_last_hidden_state=encoder_hidden,
                      decoder_last_hidden_state=decoder_hidden, router=router)


@functools.partial(jax.jit, static_argnames=("cfg", "moe_fn", "output_router"))
def _forward_jit(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, *,
                 cfg, moe_fn, output_router):
  out = forward(params, cfg, input_ids, attention_mask, decoder_input_ids, moe_fn=moe_fn,
                decoder_attention_mask=decoder_attention_mask)
  return out if output_router else out.replace(router=None)


@functools.partial(jax.jit, static_argnames=("cfg", "moe_fn", "max_new_tokens", "use_cache",
                                             "eos_token_id", "pad_token_id"))
def _generate_jit(params, input_ids, attention_mask, *, cfg, moe_fn, max_new_tokens, use_cache,
                  eos_token_id, pad_token_id):
  return switch_generate.greedy_generate(
      params, cfg, input_ids, attention_mask, max_new_tokens=max_new_tokens, use_cache=use_cache,
      eos_token_id=eos_token_id, pad_token_id=pad_token_id, moe_fn=moe_fn)


class SwitchModel:
  """A Switch Transformer bound to its params, a mesh and how its MoE layers execute.

  Args:
    config: the `SwitchConfig`.
    params: the params tree (see `config.py`), e.g. from `from_pretrained` or
      `moe_jax.checkpoints.hf_io.load_params(path, hf_key_map(config))`.
    mesh: a ('data', 'expert') mesh for the MoE layers, or None for one device. The batch must be
      divisible by its data axis and `num_experts` by its expert axis.
    execution: how the MoE layers run (capacity mode, grouped-matmul backend, all-to-all, chunks);
      default `ExecutionConfig()` (dropless). Note that capacity_mode="capacity" adds the layer's
      own per-device capacity on top of HF's per-sequence `expert_capacity` and so departs from HF.
  """

  def __init__(self, config: SwitchConfig, params: dict, *, mesh=None,
               execution: ExecutionConfig | None = None):
    check_params(params, config)
    if execution is not None and not isinstance(execution, ExecutionConfig):
      raise ValueError(f"execution must be an ExecutionConfig, got {type(execution).__name__}; "
                       "build one: moe_jax.ExecutionConfig(capacity_mode=..., gmm_backend=...).")
    self.config = config
    self.params = params
    self.mesh = mesh
    self.execution = execution if execution is not None else ExecutionConfig()
    self.moe_config = moe_config(config, params["shared"].dtype)
    self.moe_fn = DefaultMoE(self.moe_config, execution=self.execution, mesh=mesh)

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, *,
               decoder_attention_mask=None, output_router: bool = False,
               moe_fn: MoEFn | None = None) -> SwitchOutput:
    """Teacher-forced forward; see `forward`. `moe_fn` (hashable) replaces the default hook."""
    if decoder_input_ids is None:
      raise ValueError("decoder_input_ids is required: pass the decoder inputs, e.g. "
                       "switch.shift_right(labels, model.config), as for HF's forward.")
    input_ids, attention_mask = self._check_batch(input_ids, attention_mask)
    decoder_input_ids = _as_ids(decoder_input_ids, "decoder_input_ids")
    if decoder_input_ids.shape[0] != input_ids.shape[0]:
      raise ValueError(f"decoder_input_ids has batch {decoder_input_ids.shape[0]} but input_ids "
                       f"has {input_ids.shape[0]}; give both the same batch size.")
    if decoder_attention_mask is not None:
      decoder_attention_mask = jnp.asarray(decoder_attention_mask)
      _check_mask_shape(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask")
    return _forward_jit(self.params, input_ids, attention_mask, decoder_input_ids,
                        decoder_attention_mask, cfg=self.config, moe_fn=moe_fn or self.moe_fn,
                        output_router=output_router)

  def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int,
               use_cache: bool = True, eos_token_id: int | None = _CHECKPOINT_EOS,
               moe_fn: MoEFn | None = None) -> jax.Array:
    """Greedy decoding: <int32>[B, 1 + max_new_tokens] (see `generate.py`).

    Args:
      input_ids, attention_mask: the encoder input <int32>[B, Ls] and its mask.
      max_new_tokens: decoding steps at most.
      use_cache: KV-cached steps (True) or recompute the decoder over the prefix (False).
      eos_token_id: as transformers' `generate`: omitted, a row stops at the checkpoint's eos
        (`config.eos_token_id`, which `generation_config.json` overrides); an id, at that id;
        None, never (every row runs `max_new_tokens` steps).
      moe_fn: optional hashable sparse-FFN hook.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    input_ids, attention_mask = self._check_batch(input_ids, attention_mask)
    if eos_token_id is _CHECKPOINT_EOS:
      eos = self.config.eos_token_id
    else:
      eos = switch_generate.NO_EOS if eos_token_id is None else int(eos_token_id)
    return _generate_jit(self.params, input_ids, attention_mask, cfg=self.config,
                         moe_fn=moe_fn or self.moe_fn, max_new_tokens=max_new_tokens,
                         use_cache=bool(use_cache), eos_token_id=eos,
                         pad_token_id=self.config.pad_token_id)

  def _check_batch(self, input_ids, attention_mask):
    input_ids = _as_ids(input_ids, "input_ids")
    attention_mask = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                      else jnp.asarray(attention_mask))
    _check_mask_shape(attention_mask, input_ids, "attention_mask")
    if self.mesh is not None:
      num_data, _ = mesh_lib.axis_sizes(self.mesh)
      if input_ids.shape[0] % num_data:
        raise ValueError(f"batch {input_ids.shape[0]} is not divisible by the mesh's data axis "
                         f"({num_data}); pad the batch or use a smaller data axis.")
    return input_ids, attention_mask


def _as_ids(ids, name):
  ids = jnp.asarray(ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} must be integer token ids of shape [batch, length], got "
                     f"{ids.dtype}{list(ids.shape)}.")
  return ids.astype(jnp.int32)


def _check_mask_shape(mask, ids, name):
  if tuple(mask.shape) != tuple(ids.shape):
    raise ValueError(f"{name} has shape {tuple(mask.shape)} but its ids have {tuple(ids.shape)}; "
                     "give one 0/1 entry per token.")


def moe_config(config: SwitchConfig, dtype) -> MoEConfig:
  """The `MoEConfig` of the model's sparse blocks: top-1, relu, its widths, leaves of `dtype`."""
  return MoEConfig(num_experts=config.num_experts, d_model=config.d_model, d_ff=config.d_ff,
                   top_k=1, activation="relu", dtype=jnp.dtype(dtype).name)


def check_params(params: dict, config: SwitchConfig) -> None:
  """ValueError naming the problem if `params` does not have the tree layout `config` implies."""
  if not isinstance(params, dict) or "shared" not in params:
    raise ValueError("params must be the Switch params tree (a dict with 'shared', 'encoder', "
                     "'decoder'); load it with moe_jax.models.switch.from_pretrained.")
  vocab, width = params["shared"].shape
  if (vocab, width) != (config.vocab_size, config.d_model):
    raise ValueError(f"params['shared'] is {(vocab, width)} but the config says "
                     f"(vocab_size={config.vocab_size}, d_model={config.d_model}).")
  if not config.tie_word_embeddings:
    missing = [k for k in ("encoder_embed", "decoder_embed", "lm_head") if k not in params]
    if missing:
      raise ValueError(f"an untied model (tie_word_embeddings=False) needs params {missing}.")
  for stack in switch_stack.STACKS:
    blocks = params[stack]["blocks"]
    if len(blocks) != config.num_blocks(stack):
      raise ValueError(f"params['{stack}'] has {len(blocks)} blocks but the config says "
                       f"{config.num_blocks(stack)}; check num_layers / num_decoder_layers.")
    sparse = config.sparse_blocks(stack)
    for i, block in enumerate(blocks):
      if ("router" in block["ff"]) != (i in sparse):
        kind = "sparse" if i in sparse else "dense"
        raise ValueError(f"{stack} block {i} is {kind} by the config's sparse-step rule (sparse "
                         f"blocks {sparse}) but its params say otherwise; check num_sparse_*_layers"
                         " and *_sparse_step in config.json.")
      if i in sparse and block["ff"]["wi"].shape[0] != config.num_experts:
        raise ValueError(f"{stack} block {i} has {block['ff']['wi'].shape[0]} experts but the "
                         f"config says num_experts={config.num_experts}.")


def shift_right(labels, config: SwitchConfig) -> jax.Array:
  """HF's `_shift_right`: decoder inputs from labels (start token first, -100 -> pad)."""
  labels = jnp.asarray(labels, jnp.int32)
  shifted = jnp.concatenate(
      [jnp.full(labels.shape[:1] + (1,), config.decoder_start_token_id, jnp.int32),
       labels[:, :-1]], axis=1)
  return jnp.where(shifted == -100, config.pad_token_id, shifted)


def config_from_dict(model_dict: Any) -> SwitchConfig:
  """A `SwitchConfig` from a dict / `ml_collections.ConfigDict` of its fields (configs/*.py)."""
  if hasattr(model_dict, "to_dict"):
    model_dict = model_dict.to_dict()
  known = {f.name for f in dataclasses.fields(SwitchConfig) if f.compare}
  unknown = sorted(set(model_dict) - known)
  if unknown:
    raise ValueError(f"unknown SwitchConfig fields {unknown}; allowed: {sorted(known)}.")
  return SwitchConfig(**model_dict)


def from_pretrained(path: str, *, mesh=None, dtype=jnp.float32,
                    execution: ExecutionConfig | None = None) -> SwitchModel:
  """A `SwitchModel` from a Hugging Face checkpoint directory (config.json + safetensors).

  With a mesh, the expert stacks are loaded sharded over its expert axis and every other leaf is
  replicated (see `moe_jax.checkpoints.hf_io.load_params`). `moe_jax.models.from_pretrained` also
  reads moe_jax orbax directories.
  """
  from moe_jax.checkpoints import hf_io  # pylint: disable=import-outside-toplevel
  config = SwitchConfig.from_hf_dir(path)
  params = hf_io.load_params(path, hf_key_map(config), dtype=dtype, mesh=mesh)
  return SwitchModel(config, params, mesh=mesh, execution=execution)
