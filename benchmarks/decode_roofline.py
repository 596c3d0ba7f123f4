"""The memory-bandwidth bound of one cached greedy decode step (used by peer_switch.py).

A decode step of a B-token batch reads every weight it uses at least once, so its time is at least
(bytes it must read) / (memory bandwidth); `measure` puts HF's and moe_jax's measured step times
next to that bound.
"""

from __future__ import annotations

import numpy as np


def decode_step_bytes(params: dict, batch: int, source_length: int, top_k: int = 1) -> dict:
  """Bytes one cached greedy decode step must read at least once (any implementation).

  Per decoder block: self-attention q/k/v/o, cross-attention q/o (its k/v were applied to the
  encoder output once and are cached), the cached cross k/v of `source_length` positions, and
  the FFN: a dense block's weights, or a sparse block's router plus the experts the batch's
  tokens choose, estimated as E * (1 - (1 - 1/E)**(B * k)) distinct experts (uniform routing);
  then the LM head (the shared embedding when tied). The growing self-attention cache and the
  activations are left out (small at these lengths), so this under-counts.
  """
  nbytes = lambda a: int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize
  total, experts_read = 0, []
  for block in params["decoder"]["blocks"]:
    total += sum(nbytes(block["attn"][k]) for k in ("q", "k", "v", "o"))
    total += sum(nbytes(block["cross"][k]) for k in ("q", "o"))
    total += 2 * batch * source_length * np.shape(block["cross"]["k"])[1] * 4
    ff = block["ff"]
    if "router" in ff:
      num_experts = np.shape(ff["wi"])[0]
      distinct = num_experts * (1 - (1 - 1 / num_experts) ** (batch * top_k))
      per_expert = sum(nbytes(ff[k]) for k in ("wi", "wo", "wi_gate") if k in ff) / num_experts
      total += nbytes(ff["router"]) + distinct * per_expert
      experts_read.append(round(distinct, 2))
    else:
      total += sum(nbytes(ff[k]) for k in ("wi", "wo", "wi_gate") if k in ff)
  total += nbytes(params["lm_head"] if "lm_head" in params else params["shared"])
  return {"bytes": int(total), "distinct_experts_per_sparse_block": experts_read}


def measure(rows: list, jax_model, gen_batch, new_tokens: int) -> dict | None:
  """Per decode step: measured seconds (generation minus the encoder pass of the same batch,
  over the new tokens) for HF and moe_jax, next to the memory-bandwidth bound."""
  from moe_jax.sim import fit  # pylint: disable=import-outside-toplevel
  batch_text = f"{gen_batch[0]}x{gen_batch[1]}"
  encoder = [r for r in rows if r["what"] == "encoder forward" and r["batch"] == batch_text]
  if not encoder:
    return None
  generation = rows[-1]
  need = decode_step_bytes(jax_model.params, *gen_batch)
  bandwidth = fit.memory_bytes_per_s(repeats=5)
  bound = need["bytes"] / bandwidth
  step = lambda who: (generation[f"{who}_s"] - encoder[0][f"{who}_s"]) / new_tokens
  return {"bytes_per_step": need["bytes"],
          "distinct_experts_per_sparse_block": need["distinct_experts_per_sparse_block"],
          "memory_bytes_per_s": bandwidth, "bound_step_s": bound, "hf_step_s": step("hf"),
          "moe_jax_step_s": step("moe_jax"), "moe_jax_of_bound": bound / step("moe_jax"),
          "max_speedup_vs_hf_at_bound": step("hf") / bound}
