"""The Switch text task: (context, continuation) windows, the teacher-forced forward, the loss,
and the prompt side of generation.

  windows = text_windows(stream, encoder_len=64, decoder_len=64, stride=32)
  logits = forward_batch(params, cfg, batch, moe_fn)             # benchmarks: all-ones mask
  embedded = token_embeddings(params, cfg, batch)                 # {stack: (embeddings, mask)}
  total, metrics = loss(params, cfg, batch, moe_fn)               # training: HF's loss
  hidden = prompt_pass(params, cfg, input_ids, mask, moe_fn)      # the encoder over a prompt
  ids = prompt_ids(tokenizer, "The assert statement", cfg)        # text -> encoder ids
  ids = generated_ids(model.generate(...)[0], cfg)                # one generated row -> ids

A batch is a dict of <int32>[B, L] arrays: "input_ids" (encoder), "decoder_input_ids" (teacher
forcing: `decoder_start_token_id` then the labels shifted right) and, for the loss, "labels".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints import layout
from moe_jax.models.switch.config import SwitchConfig
from moe_jax.models.switch import stack
from moe_jax.models.switch.model import forward
from moe_jax.models.switch.synthetic import random_params
from moe_jax.moe_fn import MoEFn


def text_windows(stream: np.ndarray, *, encoder_len: int, decoder_len: int,
                 stride: int | None = None) -> dict[str, np.ndarray]:
  """Cuts a token stream into (context, continuation) pairs.

  Window i covers stream[s : s + encoder_len + decoder_len] with s = i * stride: the encoder reads
  the first `encoder_len` tokens, the decoder predicts the next `decoder_len` (teacher forcing:
  `decoder_input_ids` = [0] + labels[:-1], T5's `decoder_start_token_id` = pad = 0).

  Args:
    stream: <int32>[N] token ids.
    encoder_len, decoder_len: window halves.
    stride: start-to-start distance of consecutive windows (None: the window length, no overlap).

  Returns:
    {"input_ids": <int32>[W, Le], "labels": <int32>[W, Ld], "decoder_input_ids": <int32>[W, Ld]}.
  """
  span = encoder_len + decoder_len
  stride = stride or span
  starts = np.arange(0, max(len(stream) - span + 1, 0), stride)
  if len(starts) == 0:
    raise ValueError(f"a stream of {len(stream)} tokens is shorter than one window of {span}; "
                     "use shorter windows or more text.")
  idx = starts[:, None] + np.arange(span)[None, :]
  tokens = stream[idx]
  labels = tokens[:, encoder_len:]
  decoder_inputs = np.concatenate([np.zeros_like(labels[:, :1]), labels[:, :-1]], axis=1)
  return {"input_ids": tokens[:, :encoder_len], "labels": labels,
          "decoder_input_ids": decoder_inputs}


def forward_batch(params: dict, cfg: SwitchConfig, batch: dict, moe_fn: MoEFn) -> jax.Array:
  """<f32>[B, Ld, V] logits of a teacher-forced batch, every encoder token attended (mask of 1s).

  Args:
    params: the Switch params tree.
    cfg: its `SwitchConfig`.
    batch: {"input_ids": <int32>[B, Ls], "decoder_input_ids": <int32>[B, Ld], ...}.
    moe_fn: the sparse-FFN hook (e.g. a `replication.StackRunner`'s).
  """
  mask = jnp.ones_like(batch["input_ids"])
  out = forward(params, cfg, batch["input_ids"], mask, batch["decoder_input_ids"], moe_fn=moe_fn)
  return out.logits


def token_embeddings(params: dict, cfg: SwitchConfig, batch: dict) -> dict:
  """What each stack's embedding layer outputs for a `forward_batch` batch (the seed predictor's
  input): {"encoder": (<f>[B, Ls, d], <bool>[B, Ls]), "decoder": (<f>[B, Ld, d], <bool>[B, Ld])}.

  The embeddings are the rows of the stack's own table (`stack.embedding_table`) that the stack
  starts from. The masks are the batch's "attention_mask" / "decoder_attention_mask" when it has
  them, else all True: `forward_batch` routes every token.
  """
  out = {}
  for name, ids_key, mask_key in (("encoder", "input_ids", "attention_mask"),
                                  ("decoder", "decoder_input_ids", "decoder_attention_mask")):
    ids = jnp.asarray(batch[ids_key])
    mask = batch.get(mask_key)
    mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    out[name] = (stack.embedding_table(params, cfg, name)[ids], mask)
  return out


def batch_tokens(batch: dict) -> int:
  """Tokens a batch feeds the model: encoder plus decoder positions."""
  return int(batch["input_ids"].size + batch["decoder_input_ids"].size)


def prompt_pass(params: dict, cfg: SwitchConfig, input_ids: jax.Array, attention_mask: jax.Array,
                moe_fn: MoEFn) -> jax.Array:
  """The pass over a prompt, every MoE layer of it through `moe_fn`: for Switch, the encoder.

  Args:
    input_ids: <int32>[B, Ls]; attention_mask: <int or bool>[B, Ls] (0 = padding).

  Returns:
    <f>[B, Ls, d] the encoder's final-normed hidden states.
  """
  hidden, _ = stack.encode(params, cfg, input_ids, attention_mask, moe_fn=moe_fn)
  return hidden


def prompt_ids(tokenizer, text: str, cfg: SwitchConfig) -> list[int]:
  """Encoder ids of a text prompt: its SentencePiece pieces, then eos (as T5 tokenizers add)."""
  return list(tokenizer.encode(text)) + [cfg.eos_token_id]


def generated_ids(row, cfg: SwitchConfig, *, prompt_length: int | None = None) -> list[int]:
  """The new tokens of one `generate` row <int32>[1 + N]: after the start token, without
  padding, up to (not including) the first eos. (A Switch row holds only decoder tokens, so
  `prompt_length`, which decoder-only families need, is not used.)"""
  del prompt_length
  ids = [int(t) for t in row[1:] if int(t) != cfg.pad_token_id]
  return ids[:ids.index(cfg.eos_token_id)] if cfg.eos_token_id in ids else ids


def loss(params: dict, cfg: SwitchConfig, batch: dict, moe_fn: MoEFn):
  """(loss, metrics) of a batch {"input_ids", "decoder_input_ids", "labels"} (<int32>[B, L]).

  HF's training loss: token cross-entropy over non-pad labels plus the router z and aux losses of
  both stacks, weighted by `router_z_loss_coef` / `router_aux_loss_coef`. Encoder pad tokens are
  masked out of attention.

  Returns:
    (<f32>[] loss, {"ce", "z_loss", "aux_loss", "accuracy"}: <f32>[] each).
  """
  mask = (batch["input_ids"] != cfg.pad_token_id).astype(jnp.int32)
  out = forward(params, cfg, batch["input_ids"], mask, batch["decoder_input_ids"], moe_fn=moe_fn)
  labels = batch["labels"]
  weights = (labels != cfg.pad_token_id).astype(jnp.float32)
  logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  ce = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  r = out.router
  z = r.encoder_z_loss + r.decoder_z_loss
  aux = r.encoder_aux_loss + r.decoder_aux_loss
  total = ce + cfg.router_z_loss_coef * z + cfg.router_aux_loss_coef * aux
  accuracy = jnp.sum((jnp.argmax(logp, -1) == labels) * weights) / jnp.maximum(jnp.sum(weights), 1)
  return total, {"ce": ce, "z_loss": z, "aux_loss": aux, "accuracy": accuracy}


def init_params(cfg: SwitchConfig, seed: int = 0) -> dict:
  """Random f32 params (numpy) for training from scratch: `random_params` with norm scales 1."""
  params = random_params(cfg, seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.ones_like(x) if str(layout.tree_path(p)[-1]).endswith("norm") else x,
      params)
