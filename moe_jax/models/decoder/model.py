"""A decoder-only MoE language model in pure JAX, bound to params, a mesh and its MoE execution.

  model = family.from_pretrained("path/to/checkpoint", mesh=mesh)       # config.json + safetensors
  out = model(input_ids, attention_mask=am, output_router=True)          # logits, routing, aux loss
  tokens = model.generate(input_ids, attention_mask=am, max_new_tokens=16)   # KV-cached greedy

Each family subclasses `DecoderModel` with its config class; the stack is in `stack.py`, decoding
in `generate.py`. Every MoE layer runs through the `moe_fn` hook (default `DefaultMoE`: home slots
only; `replication.StackRunner.moe_fn` adds replicas).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moe_jax import mesh as mesh_lib
from moe_jax import predictor as predictor_lib
from moe_jax.config import ExecutionConfig, MoEConfig
from moe_jax.models.decoder import generate as decoder_generate
from moe_jax.models.decoder import keys as decoder_keys
from moe_jax.models.decoder import stack
from moe_jax.models.decoder.config import DecoderConfig
from moe_jax.moe_fn import DefaultMoE, MoEFn
from moe_jax import replication as replication_lib
from moe_jax.replication import ReplicationConfig, Replicator

_CHECKPOINT_EOS = object()   # generate's default: the checkpoint's eos ids


@struct.dataclass
class DecoderOutput:
  """Model outputs.

  Attributes:
    logits: <f32>[B, L, V].
    hidden: <f>[B, L, d] the final-normed hidden states (HF's `last_hidden_state`).
    router: when asked for, one `stack.MoELayerRouting` per MoE layer, in layer order.
    aux_loss: when asked for, <f32>[] HF's load-balancing loss over the MoE layers, padding
      excluded (HF's `aux_loss` with `output_router_logits=True`; not yet scaled by
      `router_aux_loss_coef`).
  """

  logits: jax.Array
  hidden: jax.Array
  router: tuple | None = None
  aux_loss: jax.Array | None = None


def forward(params: dict, cfg: DecoderConfig, input_ids: jax.Array, attention_mask: jax.Array, *,
            moe_fn: MoEFn) -> DecoderOutput:
  """One pass over <int32>[B, L] tokens (pure; not jitted), as HF's forward without a cache.

  Positions are `arange(L)` (HF's forward ignores the mask for positions); `attention_mask`
  <int or bool>[B, L] (0 = padding) masks pad keys. Outputs at padding positions are unspecified.
  """
  batch, length = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  cache = stack.init_cache(cfg, batch, length, params["embed"].dtype)
  hidden, _, records = stack.decode(params, cfg, input_ids, positions, attention_mask, cache,
                                    moe_fn=moe_fn)
  return DecoderOutput(logits=stack.lm_logits(params, cfg, hidden), hidden=hidden,
                       router=records,
                       aux_loss=stack.load_balancing_loss(records, attention_mask))


@functools.partial(jax.jit, static_argnames=("cfg", "moe_fn", "output_router", "replicator"))
def _forward_jit(params, input_ids, attention_mask, learned, *, cfg, moe_fn, output_router,
                 replicator):
  if replicator is not None:        # one pass from a fresh state: placements one layer ahead
    layers = stack.moe_layers(params, cfg)
    moe_fn = replicator.runner(layers, replicator.init_state(layers), learned).moe_fn
  out = forward(params, cfg, input_ids, attention_mask, moe_fn=moe_fn)
  return out if output_router else out.replace(router=None, aux_loss=None)


@functools.partial(jax.jit, static_argnames=("cfg", "moe_fn", "max_new_tokens", "use_cache",
                                             "pad_token_id", "replicator"))
def _generate_jit(params, input_ids, attention_mask, eos_token_ids, learned, oracle_loads,
                  calibration, *, cfg, moe_fn, max_new_tokens, use_cache, pad_token_id,
                  replicator):
  return decoder_generate.greedy_generate(
      params, cfg, input_ids, attention_mask, max_new_tokens=max_new_tokens, use_cache=use_cache,
      eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, moe_fn=moe_fn,
      replicator=replicator, learned=learned, oracle_loads=oracle_loads, calibration=calibration)


class DecoderModel:
  """A decoder-only MoE model bound to its params, a mesh and how its MoE layers execute.

  Args:
    config: the family's config (an instance of `config_class`).
    params: the params tree (see `moe_jax.models.decoder.config`).
    mesh: a ('data', 'expert') mesh for the MoE layers, or None for one device. The batch must be
      divisible by its data axis and num_experts by its expert axis.
    execution: how the MoE layers run (`ExecutionConfig`; default: dropless, which is HF's
      semantics; capacity mode drops token-choices HF never drops).
  """

  config_class = DecoderConfig

  def __init__(self, config: DecoderConfig, params: dict, *, mesh=None,
               execution: ExecutionConfig | None = None):
    if not isinstance(config, self.config_class):
      raise ValueError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                       f"{type(config).__name__}.")
    check_params(params, config)
    if execution is not None and not isinstance(execution, ExecutionConfig):
      raise ValueError(f"execution must be an ExecutionConfig, got {type(execution).__name__}; "
                       "build one: moe_jax.ExecutionConfig(capacity_mode=..., gmm_backend=...).")
    self.config, self.params, self.mesh = config, params, mesh
    self.execution = execution if execution is not None else ExecutionConfig()
    self.moe_config = moe_config(config, params["embed"].dtype)
    self.moe_fn = DefaultMoE(self.moe_config, execution=self.execution, mesh=mesh)

  @classmethod
  def from_pretrained(cls, path: str, *, mesh=None, dtype=jnp.float32,
                      execution: ExecutionConfig | None = None) -> "DecoderModel":
    """The model of a Hugging Face directory (config.json + safetensors, per-expert or fused)."""
    from moe_jax.checkpoints import hf_io  # pylint: disable=import-outside-toplevel
    config = cls.config_class.from_hf_dir(path)
    params = hf_io.load_params(path, decoder_keys.hf_key_map(config), dtype=dtype, mesh=mesh)
    return cls(config, params, mesh=mesh, execution=execution)

  def __call__(self, input_ids, attention_mask=None, *, output_router: bool = False,
               moe_fn: MoEFn | None = None, replication: ReplicationConfig | None = None,
               learned: dict | None = None) -> DecoderOutput:
    """Forward pass (see `forward`); `moe_fn` (hashable) replaces the default hook, or
    `replication` places replicas one MoE layer ahead (from an empty load history)."""
    input_ids, attention_mask = self._check_batch(input_ids, attention_mask)
    if isinstance(replication, ReplicationConfig) and replication.predictor == "oracle":
      raise ValueError("predictor='oracle' replays recorded per-pass loads, which only "
                       "generate(..., oracle_loads=...) takes; use 'history', 'pregate' or "
                       "'learned' here.")
    return _forward_jit(self.params, input_ids, attention_mask, learned, cfg=self.config,
                        moe_fn=moe_fn or self.moe_fn, output_router=output_router,
                        replicator=self._replicator(replication, learned))

  def _replicator(self, config, learned, oracle_loads=None):
    if config is None:
      return None
    if not isinstance(config, ReplicationConfig):
      raise ValueError(f"replication must be a moe_jax.ReplicationConfig, got "
                       f"{type(config).__name__}.")
    if self.mesh is None:
      raise ValueError("replication places expert copies on other devices: load the model with "
                       "mesh=moe_jax.make_mesh(data=..., expert=...).")
    if (config.predictor in predictor_lib.LEARNED_KINDS) != (learned is not None):
      raise ValueError(f"predictor={config.predictor!r} needs learned=<predictor params> (and only "
                       "learned kinds read them): train them with launch/train_predictor.py.")
    if (config.predictor == "oracle") != (oracle_loads is not None):
      raise ValueError("predictor='oracle' needs oracle_loads=<per-pass true loads> (and only it "
                       "reads them): generate the same prompts with predictor='none' and "
                       "return_stats=True, then pass {s: stats.layers[s].tokens_per_expert}.")
    return Replicator(config, self.moe_config, self.mesh, self.execution)

  def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int,
               use_cache: bool = True, eos_token_id=_CHECKPOINT_EOS,
               moe_fn: MoEFn | None = None, replication: ReplicationConfig | None = None,
               learned: dict | None = None, oracle_loads: dict | None = None,
               calibration: dict | None = None, return_stats: bool = False):
    """Greedy decoding: <int32>[B, P + max_new_tokens] (see `generate.py`).

    Args:
      input_ids, attention_mask: <int32>[B, P] left-padded prompts and their 0/1 mask.
      max_new_tokens: decoding steps at most.
      use_cache: KV-cached steps (True) or recompute the buffer each step (False).
      eos_token_id: omitted: the checkpoint's eos id(s); an int or a list: stop at those; None:
        never stop (as HF).
      moe_fn: optional hashable MoE hook.
      replication: optional `ReplicationConfig`: replicas placed one MoE layer ahead in the
        prefill and in every decode step, the load history carried from step to step.
      learned: the learned predictor's params (predictor="learned" only).
      oracle_loads: predictor="oracle" only (benchmarks: an upper bound, not a serving policy):
        stack -> <f32 or int>[passes, n MoE layers, E] the true loads of every pass (passes >=
        max_new_tokens + 1 cached, max_new_tokens uncached), e.g. `tokens_per_expert` of
        `GenerationStats.layers` from generating the same prompts with predictor="none".
      calibration: predictor="eplb": stack -> <f>[n MoE layers, E] the per-expert counts EPLB
        places from (e.g. `moe_jax.expert_counts.load(path)`); refreshed every
        `replication.eplb_refresh` passes when that is > 0.
      return_stats: with `replication`, also return its `generate.GenerationStats`.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    input_ids, attention_mask = self._check_batch(input_ids, attention_mask)
    _check_left_padded(attention_mask)
    eos = (self.config.eos_token_id if eos_token_id is _CHECKPOINT_EOS
           else () if eos_token_id is None
           else (int(eos_token_id),) if np.ndim(eos_token_id) == 0
           else tuple(int(i) for i in eos_token_id))
    eos = jnp.asarray(eos or (-1,), jnp.int32)     # traced: no recompilation per eos choice
    replicator = self._replicator(replication, learned, oracle_loads)
    if oracle_loads is not None:
      oracle_loads = self._check_oracle_loads(oracle_loads, max_new_tokens + bool(use_cache))
    if calibration is not None:
      calibration = self._check_calibration(calibration, replication)
    out = _generate_jit(self.params, input_ids, attention_mask, eos, learned, oracle_loads,
                        calibration, cfg=self.config,
                        moe_fn=moe_fn or self.moe_fn, max_new_tokens=max_new_tokens,
                        use_cache=bool(use_cache), pad_token_id=self.config.generation_pad_id,
                        replicator=replicator)
    if replicator is None:
      return out
    return out if return_stats else out[0]

  def _check_calibration(self, calibration: dict, replication) -> dict:
    """`calibration` as f32 after checking it fits the model (only eplb reads it)."""
    if replication is None or replication.predictor != "eplb":
      raise ValueError("calibration= is read by predictor='eplb' only; pass "
                       "replication=ReplicationConfig(predictor='eplb', ...) with it.")
    layers = stack.moe_layers(self.params, self.config)
    state = replication_lib.init_state({s: len(v) for s, v in layers.items()},
                                       self.config.num_experts)
    return replication_lib.calibrate(state, calibration).calibration

  def _check_oracle_loads(self, oracle_loads: dict, passes: int) -> dict:
    """`oracle_loads` as f32 after checking it has a [>= passes, n, E] array per MoE stack."""
    layers = stack.moe_layers(self.params, self.config)
    if not isinstance(oracle_loads, dict) or set(oracle_loads) != set(layers):
      raise ValueError(f"oracle_loads must map each MoE stack {sorted(layers)} to its per-pass "
                       "true loads; pass {s: stats.layers[s].tokens_per_expert}.")
    out = {}
    for name, loads in oracle_loads.items():
      shape = tuple(np.shape(loads))
      want = (len(layers[name]), self.config.num_experts)
      if len(shape) != 3 or shape[0] < passes or shape[1:] != want:
        raise ValueError(f"oracle_loads[{name!r}] has shape {shape}; it needs [passes >= "
                         f"{passes}, {want[0]}, {want[1]}]: the stats of a generate with the "
                         "same max_new_tokens and use_cache.")
      out[name] = jnp.asarray(loads, jnp.float32)
    return out

  def _check_batch(self, input_ids, attention_mask):
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integer token ids of shape [batch, length], got "
                       f"{input_ids.dtype}{list(input_ids.shape)}.")
    attention_mask = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                      else jnp.asarray(attention_mask))
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
      raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
                       f"has {tuple(input_ids.shape)}; give one 0/1 entry per token.")
    if self.mesh is not None:
      num_data, _ = mesh_lib.axis_sizes(self.mesh)
      if input_ids.shape[0] % num_data:
        raise ValueError(f"batch {input_ids.shape[0]} is not divisible by the mesh's data axis "
                         f"({num_data}); pad the batch or use a smaller data axis.")
    return input_ids.astype(jnp.int32), attention_mask.astype(jnp.int32)


def _check_left_padded(attention_mask) -> None:
  mask = np.asarray(attention_mask)
  if np.any(np.diff(mask, axis=1) < 0):
    row = int(np.nonzero(np.any(np.diff(mask, axis=1) < 0, axis=1))[0][0])
    raise ValueError(f"attention_mask row {row} has padding after a real token; left-pad the "
                     "prompts for generation (HF's padding_side='left').")


def moe_config(config: DecoderConfig, dtype) -> MoEConfig:
  """The `MoEConfig` of the MoE layers: top-k SwiGLU experts, renormalised iff norm_topk_prob,
  routed by the family's rule (`config.router_options`)."""
  return MoEConfig(num_experts=config.num_experts, d_model=config.hidden_size,
                   d_ff=config.expert_width, top_k=config.num_experts_per_tok,
                   activation="silu", renormalize=config.norm_topk_prob,
                   dtype=jnp.dtype(dtype).name, **config.router_options)


def check_params(params: dict, config: DecoderConfig) -> None:
  """ValueError naming the problem if `params` does not have the tree layout `config` implies."""
  if not isinstance(params, dict) or "embed" not in params or "layers" not in params:
    raise ValueError("params must be the decoder params tree (a dict with 'embed', 'layers', "
                     "'final_norm'); load it with the family's from_pretrained.")
  if tuple(params["embed"].shape) != (config.vocab_size, config.hidden_size):
    raise ValueError(f"params['embed'] is {tuple(params['embed'].shape)} but the config says "
                     f"(vocab_size={config.vocab_size}, hidden_size={config.hidden_size}).")
  if not config.tie_word_embeddings and "lm_head" not in params:
    raise ValueError("an untied model (tie_word_embeddings=False) needs params['lm_head'].")
  if len(params["layers"]) != config.num_hidden_layers:
    raise ValueError(f"params have {len(params['layers'])} layers but the config says "
                     f"num_hidden_layers={config.num_hidden_layers}.")
  sparse = config.sparse_layers
  for i, layer in enumerate(params["layers"]):
    if ("router" in layer["mlp"]) != (i in sparse):
      kind = "MoE" if i in sparse else "dense"
      raise ValueError(f"layer {i} is {kind} by the config (MoE layers {list(sparse)}) but its "
                       "params say otherwise; check mlp_only_layers / decoder_sparse_step.")
    if i in sparse and layer["mlp"]["wi"].shape[0] != config.num_experts:
      raise ValueError(f"layer {i} has {layer['mlp']['wi'].shape[0]} experts but the config says "
                       f"num_experts={config.num_experts}.")
