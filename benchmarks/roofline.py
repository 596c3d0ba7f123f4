"""Lower bounds on the Switch model's time on this machine (used by peer_switch.py).

Any implementation must read every weight a call uses at least once and do the call's FLOPs, so
its time is at least max(bytes / memory bandwidth, FLOPs / matmul FLOP/s). `decode_measure` puts
HF's and moe_jax's measured cached-decode step times next to the bandwidth bound;
`encoder_measure` puts each encoder forward next to max(bandwidth bound, compute bound). HF's time
over the bound is the most any implementation could gain over HF here at that precision.
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
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  nbytes = lambda a: int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize
  total, experts_read = 0, []
  _, decoder = switch.STACKS
  for block in params[decoder]["blocks"]:
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


def decode_measure(rows: list, jax_model, gen_batch, new_tokens: int,
                   machine: dict) -> dict | None:
  """Per decode step: measured seconds (generation minus the encoder pass of the same batch,
  over the new tokens) for HF and moe_jax, next to the memory-bandwidth bound.

  machine: {"memory_bytes_per_s": ...} (see `machine_rates`)."""
  batch_text = f"{gen_batch[0]}x{gen_batch[1]}"
  encoder = [r for r in rows if r["what"] == "encoder forward" and r["batch"] == batch_text]
  if not encoder:
    return None
  generation = rows[-1]
  need = decode_step_bytes(jax_model.params, *gen_batch)
  bandwidth = machine["memory_bytes_per_s"]
  bound = need["bytes"] / bandwidth
  step = lambda who: (generation[f"{who}_s"] - encoder[0][f"{who}_s"]) / new_tokens
  return {"bytes_per_step": need["bytes"],
          "distinct_experts_per_sparse_block": need["distinct_experts_per_sparse_block"],
          "memory_bytes_per_s": bandwidth, "bound_step_s": bound, "hf_step_s": step("hf"),
          "moe_jax_step_s": step("moe_jax"), "moe_jax_of_bound": bound / step("moe_jax"),
          "max_speedup_vs_hf_at_bound": step("hf") / bound}


def encoder_bytes_flops(params: dict, batch: int, length: int,
                        experts_hit: list[int]) -> dict:
  """Bytes an encoder forward of B x L tokens must read at least once, and its FLOPs.

  Per block: attention q/k/v/o (2 T d_in d_out each, plus 4 B H L^2 d_kv for scores and the
  weighted sum), then a dense FFN (2 T per weight entry) or a sparse one: the router plus the
  experts the tokens actually chose (`experts_hit[i]` for the i-th sparse block, from the real
  routing of this batch), with every token through one expert (top-1; k times that for top-k).
  The embedding rows, norms, relative-position bias and activations are left out: the bound
  under-counts, so HF / bound over-states what can be gained.
  """
  tokens = batch * length
  size = lambda a: int(np.prod(np.shape(a)))
  nbytes = lambda a: size(a) * np.dtype(a.dtype).itemsize
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  total_bytes, flops, sparse = 0, 0.0, 0
  encoder, _ = switch.STACKS
  for block in params[encoder]["blocks"]:
    attn = block["attn"]
    total_bytes += sum(nbytes(attn[k]) for k in ("q", "k", "v", "o"))
    flops += 2.0 * tokens * sum(size(attn[k]) for k in ("q", "k", "v", "o"))
    inner = np.shape(attn["q"])[1]
    flops += 4.0 * batch * length * length * inner
    ff = block["ff"]
    names = [k for k in ("wi", "wo", "wi_gate") if k in ff]
    if "router" in ff:
      num_experts = np.shape(ff["wi"])[0]
      per_expert_bytes = sum(nbytes(ff[k]) for k in names) / num_experts
      per_expert_size = sum(size(ff[k]) for k in names) / num_experts
      total_bytes += nbytes(ff["router"]) + experts_hit[sparse] * per_expert_bytes
      flops += 2.0 * tokens * (size(ff["router"]) + per_expert_size)
      sparse += 1
    else:
      total_bytes += sum(nbytes(ff[k]) for k in names)
      flops += 2.0 * tokens * sum(size(ff[k]) for k in names)
  return {"bytes": int(total_bytes), "flops": flops}


def encoder_measure(row: dict, jax_model, batch: int, length: int, experts_hit: list[int],
                    machine: dict) -> dict:
  """One encoder row next to max(bytes / bandwidth, FLOPs / matmul FLOP/s).

  machine: {"memory_bytes_per_s": ..., "flops_per_s": ...} from `machine_rates`."""
  need = encoder_bytes_flops(jax_model.params, batch, length, experts_hit)
  memory_s = need["bytes"] / machine["memory_bytes_per_s"]
  compute_s = need["flops"] / machine["flops_per_s"]
  bound = max(memory_s, compute_s)
  return {"batch": row["batch"], "bytes": need["bytes"], "flops": need["flops"],
          "experts_hit_per_sparse_block": list(experts_hit), "memory_bound_s": memory_s,
          "compute_bound_s": compute_s, "bound_s": bound, "hf_s": row["hf_s"],
          "moe_jax_s": row["moe_jax_s"], "moe_jax_of_bound": bound / row["moe_jax_s"],
          "max_speedup_vs_hf_at_bound": row["hf_s"] / bound}


def add_bounds(result, jax_model, batches, hit, gen_batch, new_tokens, log):
  """result["encoder_bounds"] and result["decode_roofline"]: each of peer_switch's measured times
  (result["timings"]: the encoder rows of `batches`, then generation) next to its lower bound.

  hit: per encoder batch, `encoder_experts_hit` of it."""
  d_model, d_ff = jax_model.config.d_model, jax_model.config.d_ff
  machine = machine_rates(d_model, d_ff)
  result["machine_rates"] = machine
  rows = result["timings"]
  result["encoder_bounds"] = [encoder_measure(row, jax_model, b, l, h, machine)
                              for row, (b, l), h in zip(rows, batches, hit)]
  for r in result["encoder_bounds"]:
    log(f"{result['setup']}: encoder {r['batch']} needs >= {r['bytes'] / 1e6:.0f} MB and "
        f"{r['flops'] / 1e9:.1f} GFLOP (experts hit {r['experts_hit_per_sparse_block']}): bound "
        f"{r['bound_s'] * 1e3:.1f} ms (memory {r['memory_bound_s'] * 1e3:.1f}, compute "
        f"{r['compute_bound_s'] * 1e3:.1f}); moe_jax at {r['moe_jax_of_bound'] * 100:.0f}% of "
        f"it; HF / bound = {r['max_speedup_vs_hf_at_bound']:.2f}x")
  r = result["decode_roofline"] = decode_measure(rows, jax_model, gen_batch, new_tokens, machine)
  if r:
    log(f"{result['setup']}: decode step HF {r['hf_step_s'] * 1e3:.1f} ms, moe_jax "
        f"{r['moe_jax_step_s'] * 1e3:.1f} ms; reads >= {r['bytes_per_step'] / 1e6:.0f} MB at "
        f"{r['memory_bytes_per_s'] / 1e9:.1f} GB/s = {r['bound_step_s'] * 1e3:.1f} ms bound "
        f"(moe_jax at {r['moe_jax_of_bound'] * 100:.0f}% of it; HF / bound = "
        f"{r['max_speedup_vs_hf_at_bound']:.2f}x is the most any fp32 implementation can gain)")


def encoder_experts_hit(jax_model, input_ids, attention_mask) -> list[int]:
  """Distinct experts the real router sends this batch's tokens to, per encoder sparse block."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax.models.switch import stack as switch_stack  # pylint: disable=import-outside-toplevel
  _, records = switch_stack.encode(jax_model.params, jax_model.config,
                                   jnp.asarray(input_ids, jnp.int32),
                                   jnp.asarray(attention_mask, jnp.int32),
                                   moe_fn=jax_model.moe_fn)
  hit = []
  for record in records:
    chosen = np.asarray(record.expert_index)[np.asarray(record.dispatched)]
    hit.append(int(np.unique(chosen).size))
  return hit


def machine_rates(d_model: int, d_ff: int) -> dict:
  """Measured memory bandwidth and dense matmul FLOP/s (an FFN of 1024 tokens at these widths,
  every core XLA gives one CPU device) on this machine, now."""
  from moe_jax.sim import fit  # pylint: disable=import-outside-toplevel
  return {"memory_bytes_per_s": fit.memory_bytes_per_s(repeats=5),
          "flops_per_s": fit.expert_flops_per_s(1024, d_model, d_ff, repeats=5)}


# --- decoder-only families (used by decoder_vs_hf.py) ---


def _nbytes(a) -> int:
  return int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize


def _size(a) -> int:
  return int(np.prod(np.shape(a)))


def distinct_experts(num_experts: int, choices: int) -> float:
  """Expected distinct experts `choices` uniform top-k choices hit: E * (1 - (1 - 1/E)**choices)."""
  return num_experts * (1 - (1 - 1 / num_experts) ** choices)


def _decoder_head(params: dict, cfg):
  return params["embed"] if cfg.tie_word_embeddings else params["lm_head"]


def _decoder_layer_parts(layer: dict) -> tuple[list, dict | None]:
  """(always-read arrays of one layer: norms, attention and a dense MLP; its MoE MLP or None)."""
  always = [layer["attn_norm"], layer["mlp_norm"], *layer["attn"].values()]
  mlp = layer["mlp"]
  if "router" in mlp:
    return always, mlp
  return always + [mlp[k] for k in ("wi_gate", "wi", "wo")], None


def decoder_decode_step_need(params: dict, cfg, batch: int, context: float) -> dict:
  """Bytes and FLOPs of one cached greedy decode step of `batch` rows (any implementation).

  Bytes read at least once, per layer: its norms, attention q/k/v/o (+ q/k norms), the K and V
  cache of `context` valid slots per row (2 * B * context * Hkv * hd), then a dense MLP's weights
  or an MoE layer's router plus the experts the B * k choices hit, estimated with uniform routing
  (`distinct_experts`); then the final norm and the LM head (the embedding when tied). FLOPs: 2
  per weight entry per token (k experts per token) plus 4 * H * hd * context per token for the
  attention scores and weighted sum. The B embedding rows and activations are left out (the
  bound under-counts).

  Args:
    params: the decoder params tree (see moe_jax.models.decoder.config).
    cfg: its `DecoderConfig`.
    batch: B rows decoding one token each.
    context: mean valid cache slots a step attends to (prompt + tokens generated so far).
  """
  total, flops, experts_read = 0.0, 0.0, []
  cache_itemsize = np.dtype(params["embed"].dtype).itemsize
  kv_width = cfg.num_key_value_heads * cfg.head_width
  for layer in params["layers"]:
    always, moe = _decoder_layer_parts(layer)
    total += sum(_nbytes(a) for a in always)
    flops += 2.0 * batch * sum(_size(a) for a in always if np.ndim(a) == 2)
    total += 2 * batch * context * kv_width * cache_itemsize
    flops += 4.0 * batch * cfg.num_attention_heads * cfg.head_width * context
    if moe is not None:
      num_experts = np.shape(moe["wi"])[0]
      per_expert = sum(_nbytes(moe[k]) for k in ("wi_gate", "wi", "wo")) / num_experts
      per_expert_size = sum(_size(moe[k]) for k in ("wi_gate", "wi", "wo")) / num_experts
      hit = distinct_experts(num_experts, batch * cfg.num_experts_per_tok)
      total += _nbytes(moe["router"]) + hit * per_expert
      flops += 2.0 * batch * (_size(moe["router"]) + cfg.num_experts_per_tok * per_expert_size)
      experts_read.append(round(hit, 2))
  head = _decoder_head(params, cfg)
  total += _nbytes(head) + _nbytes(params["final_norm"])
  flops += 2.0 * batch * _size(head)
  return {"bytes": int(total), "flops": flops, "context": context,
          "distinct_experts_per_moe_layer": experts_read}


def decoder_prefill_need(params: dict, cfg, batch: int, length: int,
                         experts_hit: list[int] | None = None) -> dict:
  """Bytes and FLOPs of one forward over B x L prompt tokens with every position's logits (what
  `model(ids)` computes on both sides), from an empty cache.

  Bytes read at least once: every layer's norms, attention and dense MLP weights, each MoE
  layer's router plus the experts its tokens chose (`experts_hit[i]` for the i-th MoE layer, from
  the real routing; None: the uniform estimate for B * L * k choices), the final norm and the LM
  head. FLOPs: 2 * T per weight entry a token uses (attention, router, its k experts' three
  matrices, the LM head) plus causal attention: 4 * H * hd per (query, key at or before it) pair,
  B * L * (L + 1) / 2 pairs. Embedding lookups, norms, rotary and softmax are left out (the bound
  under-counts).
  """
  tokens = batch * length
  pairs = batch * length * (length + 1) / 2
  total, flops, moe_index, hits = 0.0, 0.0, 0, []
  for layer in params["layers"]:
    always, moe = _decoder_layer_parts(layer)
    total += sum(_nbytes(a) for a in always)
    flops += 2.0 * tokens * sum(_size(a) for a in always if np.ndim(a) == 2)
    flops += 4.0 * pairs * cfg.num_attention_heads * cfg.head_width
    if moe is not None:
      num_experts = np.shape(moe["wi"])[0]
      per_expert = sum(_nbytes(moe[k]) for k in ("wi_gate", "wi", "wo")) / num_experts
      per_expert_size = sum(_size(moe[k]) for k in ("wi_gate", "wi", "wo")) / num_experts
      hit = (experts_hit[moe_index] if experts_hit is not None
             else distinct_experts(num_experts, tokens * cfg.num_experts_per_tok))
      total += _nbytes(moe["router"]) + hit * per_expert
      flops += 2.0 * tokens * (_size(moe["router"]) + cfg.num_experts_per_tok * per_expert_size)
      hits.append(hit)
      moe_index += 1
  head = _decoder_head(params, cfg)
  total += _nbytes(head) + _nbytes(params["final_norm"])
  flops += 2.0 * tokens * _size(head)
  return {"bytes": int(total), "flops": flops, "experts_hit_per_moe_layer": hits}


def bound_of(need: dict, machine: dict) -> dict:
  """need {"bytes", "flops"} -> max(bytes / bandwidth, FLOPs / matmul FLOP/s), both parts, in s.

  machine: {"memory_bytes_per_s", "flops_per_s"} (e.g. `best_rates`)."""
  memory_s = need["bytes"] / machine["memory_bytes_per_s"]
  compute_s = need["flops"] / machine["flops_per_s"]
  return {"memory_bound_s": memory_s, "compute_bound_s": compute_s,
          "bound_s": max(memory_s, compute_s)}


def _fastest_s(fn, repeats: int) -> float:
  """The fastest of `repeats` timed calls of fn() (after one untimed call): on a shared machine
  the fastest run is the closest to what the hardware can do, which is what a bound needs."""
  import time  # pylint: disable=import-outside-toplevel
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def xla_peak_rates(d_model: int, d_ff: int, *, tokens: int = 1024, num_bytes: int = 1 << 28,
                   repeats: int = 7) -> dict:
  """`machine_rates`' two measurements (a jitted sum of a large f32 array; relu(x wi) wo on
  <f32>[tokens, d_model]) on the default jax device, from the fastest of `repeats` runs."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  key = jax.random.key(0)
  big = jnp.ones((num_bytes // 4,), jnp.float32)
  x = jax.random.normal(key, (tokens, d_model))
  wi = jax.random.normal(key, (d_model, d_ff)) * d_model ** -0.5
  wo = jax.random.normal(key, (d_ff, d_model)) * d_ff ** -0.5
  total = jax.jit(jnp.sum)
  ffn = jax.jit(lambda x, wi, wo: jax.nn.relu(x @ wi) @ wo)
  memory = num_bytes / _fastest_s(lambda: jax.block_until_ready(total(big)), repeats)
  flops = 4.0 * tokens * d_model * d_ff / _fastest_s(
      lambda: jax.block_until_ready(ffn(x, wi, wo)), repeats)
  return {"memory_bytes_per_s": memory, "flops_per_s": flops}


def torch_rates(d_model: int, d_ff: int, *, tokens: int = 1024, num_bytes: int = 1 << 28,
                repeats: int = 7) -> dict:
  """`xla_peak_rates` measured with torch at its current thread count (same shapes, fastest
  of `repeats` runs)."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(0)
  big = torch.ones(num_bytes // 4, dtype=torch.float32)
  x = torch.randn(tokens, d_model, generator=gen)
  wi = torch.randn(d_model, d_ff, generator=gen) * d_model ** -0.5
  wo = torch.randn(d_ff, d_model, generator=gen) * d_ff ** -0.5
  with torch.inference_mode():
    memory = num_bytes / _fastest_s(lambda: big.sum().item(), repeats)
    flops = 4.0 * tokens * d_model * d_ff / _fastest_s(lambda: torch.relu(x @ wi) @ wo, repeats)
  return {"memory_bytes_per_s": memory, "flops_per_s": flops}


def best_rates(*rates: dict) -> dict:
  """The fastest measured memory bandwidth and FLOP/s among several measurements (dicts of
  `machine_rates` form): what this machine can do, whoever measured it."""
  return {key: max(r[key] for r in rates) for key in ("memory_bytes_per_s", "flops_per_s")}
