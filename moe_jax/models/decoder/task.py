"""The decoder-only text task: next-token windows, the batch forward, the loss, the prompt side of
generation, and random params.

  windows = text_windows(stream, length=128, stride=64)          # next-token windows
  logits = forward_batch(params, cfg, batch, moe_fn)              # benchmarks: every token visible
  embedded = token_embeddings(params, cfg, batch)                 # {"layers": (embeddings, mask)}
  total, metrics = loss(params, cfg, batch, moe_fn)               # training: CE + HF's aux loss
  hidden = prompt_pass(params, cfg, input_ids, mask, moe_fn)      # the decoder over a prompt
  ids = prompt_ids(tokenizer, "The assert statement", cfg)        # text -> prompt ids
  ids = generated_ids(tokens[0], cfg, prompt_length=P)            # a generated row -> new ids

A batch is a dict of <int32>[B, L] arrays: "input_ids" and, for the loss, "labels": the next
token of each position (already shifted; -100 = ignored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints import synthetic
from moe_jax.models.decoder import keys as decoder_keys
from moe_jax.models.decoder import stack
from moe_jax.models.decoder.config import DecoderConfig
from moe_jax.models.decoder.model import forward
from moe_jax.moe_fn import MoEFn

IGNORE = -100
_NORMS = ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm", "q_a_norm", "kv_a_norm")


def text_windows(stream: np.ndarray, *, length: int, stride: int | None = None
                 ) -> dict[str, np.ndarray]:
  """Cuts a token stream into next-token windows.

  Window i reads stream[s : s + length] and predicts stream[s + 1 : s + length + 1], with
  s = i * stride.

  Args:
    stream: <int32>[N] token ids.
    length: tokens per window.
    stride: start-to-start distance (None: `length`, no overlap).

  Returns:
    {"input_ids": <int32>[W, length], "labels": <int32>[W, length]}.
  """
  stride = stride or length
  starts = np.arange(0, max(len(stream) - length, 0), stride)
  if len(starts) == 0:
    raise ValueError(f"a stream of {len(stream)} tokens is shorter than one window of "
                     f"{length} + 1; use shorter windows or more text.")
  tokens = stream[starts[:, None] + np.arange(length + 1)[None, :]]
  return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def forward_batch(params: dict, cfg: DecoderConfig, batch: dict, moe_fn: MoEFn) -> jax.Array:
  """<f32>[B, L, V] logits of {"input_ids": <int32>[B, L]}, every token visible."""
  mask = jnp.ones_like(batch["input_ids"])
  return forward(params, cfg, batch["input_ids"], mask, moe_fn=moe_fn).logits


def token_embeddings(params: dict, cfg: DecoderConfig, batch: dict) -> dict:
  """What the stack's embedding layer outputs for a `forward_batch` batch (the seed predictor's
  input): {"layers": (<f>[B, L, d] rows of params["embed"], <bool>[B, L] mask)}.

  The mask is the batch's "attention_mask" when it has one, else all True: `forward_batch`
  routes every token.
  """
  del cfg    # no family scales its embedding
  ids = jnp.asarray(batch["input_ids"])
  mask = batch.get("attention_mask")
  mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
  return {stack.STACK: (params["embed"][ids], mask)}


def batch_tokens(batch: dict) -> int:
  """Tokens a batch feeds the model."""
  return int(batch["input_ids"].size)


def prompt_pass(params: dict, cfg: DecoderConfig, input_ids: jax.Array, attention_mask: jax.Array,
                moe_fn: MoEFn) -> jax.Array:
  """The decoder over a prompt, every MoE layer through `moe_fn`: <f>[B, L, d] final-normed."""
  return forward(params, cfg, input_ids, attention_mask, moe_fn=moe_fn).hidden


def prompt_ids(tokenizer, text: str, cfg: DecoderConfig) -> list[int]:
  """Prompt ids of a text: the tokenizer's ids, after `bos_token_id` when the model has one
  (unless the tokenizer already put it first)."""
  ids = list(tokenizer.encode(text))
  if cfg.bos_token_id is not None and ids[:1] != [cfg.bos_token_id]:
    ids = [cfg.bos_token_id] + ids
  return ids


def generated_ids(row, cfg: DecoderConfig, *, prompt_length: int | None = None) -> list[int]:
  """The new tokens of one `generate` row <int32>[P + N]: those after the prompt, up to (not
  including) the first eos.

  A decoder row starts with its (padded) prompt, so `prompt_length` = P is required.
  """
  if prompt_length is None:
    raise ValueError("a decoder-only generate row starts with its prompt: pass "
                     "prompt_length=input_ids.shape[1].")
  ids = [int(t) for t in row[prompt_length:]]
  stops = [i for i, t in enumerate(ids) if t in cfg.eos_token_id]
  return ids[:stops[0]] if stops else ids


def loss(params: dict, cfg: DecoderConfig, batch: dict, moe_fn: MoEFn):
  """(loss, metrics) of {"input_ids", "labels"} (<int32>[B, L]), as HF's causal LM loss.

  Token cross-entropy over labels != -100 plus `router_aux_loss_coef` times HF's load-balancing
  loss over the MoE layers (every token visible).

  Returns:
    (<f32>[] loss, {"ce", "aux_loss", "accuracy"}: <f32>[] each).
  """
  out = forward(params, cfg, batch["input_ids"], jnp.ones_like(batch["input_ids"]),
                moe_fn=moe_fn)
  return loss_terms(out.logits, out.aux_loss, batch["labels"], cfg)


def loss_terms(logits: jax.Array, aux_loss: jax.Array, labels: jax.Array, cfg: DecoderConfig):
  """`loss` from the forward's <f32>[B, L, V] logits and <f32>[] aux loss, <int32>[B, L] labels."""
  weights = (labels != IGNORE).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(labels == IGNORE, 0, labels)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  count = jnp.maximum(jnp.sum(weights), 1.0)
  ce = jnp.sum(nll * weights) / count
  accuracy = jnp.sum((jnp.argmax(logp, -1) == labels) * weights) / count
  total = ce + cfg.router_aux_loss_coef * aux_loss
  return total, {"ce": ce, "aux_loss": aux_loss, "accuracy": accuracy}


def moe_layers(params: dict, cfg: DecoderConfig) -> dict[str, list[dict]]:
  """{"layers": [MoE layer params, in order]} (the view `replication.StackRunner` takes)."""
  return stack.moe_layers(params, cfg)


def _draw(rng: np.random.Generator, path, shape) -> np.ndarray:
  """Norm scales 1 + N(0, 0.1), embeddings N(0, 1), biases N(0, 0.1^2), kernels N(0, 1/fan_in)."""
  x = rng.standard_normal(shape, dtype=np.float32)
  if path[-1] in _NORMS:
    return 1.0 + 0.1 * x
  if path[-1] == "embed":
    return x
  if len(shape) == 1:                           # q/k/v biases, the router's selection bias
    return 0.1 * x
  return x * np.float32(shape[-2] ** -0.5)      # kernels are [in, out] (stacks [E, in, out])


def random_params(cfg: DecoderConfig, seed: int = 0, dtype=np.float32) -> dict:
  """A random numpy params tree of `cfg` (every leaf different), for tests and benchmarks."""
  shapes = decoder_keys.hf_key_map(cfg).param_shapes()
  return synthetic.random_tree(shapes, _draw, seed=seed, dtype=dtype)


def init_params(cfg: DecoderConfig, seed: int = 0) -> dict:
  """Random f32 params (numpy) for training from scratch: `random_params` with norm scales 1."""
  shapes = decoder_keys.hf_key_map(cfg).param_shapes()
  draw = lambda rng, path, shape: (np.ones(shape, np.float32) if path[-1] in _NORMS
                                   else _draw(rng, path, shape))
  return synthetic.random_tree(shapes, draw, seed=seed)
