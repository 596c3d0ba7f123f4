"""Builds the tiny Hugging Face decoder-only MoE fixtures that tests/test_decoder_models.py compares
against.

Needs torch and transformers (5.24.0 was used); the tests themselves do not. Run from the repo root:

  python tests/make_decoder_fixtures.py [NAME ...]      # all fixtures, or only the named ones

For each spec below it builds a random `*ForCausalLM` (weights redrawn so mistakes show: norm
scales in [0.5, 1.5], small embeddings so the RMSNorm eps matters, attention-output, expert-down
and router projections scaled up), saves it with `save_pretrained` into
tests/fixtures/decoder/<name>/ (per-expert keys, or the fused 3-D expert tensors with
`save_original_format=False`; weights rounded to bfloat16 first and stored as bfloat16, so the
files are half the size and the float32 references exact) and records, in float32 eval mode,
into <name>/reference.npz:
  inputs: input_ids, attention_mask (a left-padded batch);
  logits of the plain forward; aux_loss (`output_router_logits=True`; softmax-routed families
    only: HF computes none for DeepSeek / GLM);
  per MoE layer j ("moe{j}_" prefix): expert_index, expert_weight, router_logits (from the
    router module itself);
  greedy generations (max_new_tokens new tokens, right-filled with the pad id to full width):
    gen_cached / gen_uncached with the checkpoint's eos (omitted from `generate`), and
    gen_no_eos with `eos_token_id=None` (never stops).
Seeds whose top-k routing or greedy choices are near ties (margin < 1e-3) are rejected.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "decoder")
MARGIN = 1e-3
PROMPT, NEW_TOKENS = 9, 8
LEFT_PADS = (0, 2, 4, 1)          # per row of the batch

COMMON = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=256)

SPECS = {
    # Fused expert tensors on disk; head_dim 12 != 32 / 4; layer 1 dense (mlp_only_layers);
    # renormalised top-2; num_experts written as transformers 5.24 does (num_local_experts).
    "qwen3_moe": dict(
        config="Qwen3MoeConfig", model="Qwen3MoeForCausalLM", fused=True, seed=0,
        hf=dict(intermediate_size=40, moe_intermediate_size=8, num_hidden_layers=3, head_dim=12,
                num_experts=8, norm_topk_prob=True, mlp_only_layers=[1], rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                tie_word_embeddings=False)),
    # Per-expert keys (block_sparse_moe.experts.{e}.w1/w3/w2); tied head; always renormalised.
    "mixtral": dict(
        config="MixtralConfig", model="MixtralForCausalLM", fused=False, seed=1,
        hf=dict(intermediate_size=8, num_hidden_layers=2, num_local_experts=8, rms_norm_eps=1e-5,
                tie_word_embeddings=True, bos_token_id=1, pad_token_id=0)),
    # Per-expert keys; full-width q/k norm, clip_qkv binding; raw (not renormalised) top-2.
    "olmoe": dict(
        config="OlmoeConfig", model="OlmoeForCausalLM", fused=False, seed=2,
        hf=dict(intermediate_size=8, num_hidden_layers=2, num_experts=8, norm_topk_prob=False,
                clip_qkv=2.0, rms_norm_eps=1e-5, pad_token_id=1, tie_word_embeddings=False)),
    # Per-expert keys; q/k/v biases; a sigmoid-gated shared expert; layer 0 dense; raw top-2.
    "qwen2_moe": dict(
        config="Qwen2MoeConfig", model="Qwen2MoeForCausalLM", fused=False, seed=3,
        hf=dict(intermediate_size=40, moe_intermediate_size=8, shared_expert_intermediate_size=12,
                num_hidden_layers=3, num_experts=8, norm_topk_prob=False, mlp_only_layers=[0],
                qkv_bias=True, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # Per-expert keys; MLA with a q LoRA rank and interleaved rope; sigmoid router with a random
    # selection bias, 4 groups of 2 (best 2 eligible), renormalised, x2.5; two shared experts;
    # layer 0 dense (first_k_dense_replace).
    "deepseek_v3": dict(
        config="DeepseekV3Config", model="DeepseekV3ForCausalLM", fused=False, seed=4,
        hf=dict(intermediate_size=40, moe_intermediate_size=8, num_hidden_layers=3,
                num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=6,
                qk_rope_head_dim=4, v_head_dim=10, rope_interleave=True, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # Fused expert tensors; partial rotary (half of head_dim 12); q/k/v biases and per-head q/k
    # norm; sigmoid router (one group) with a random bias, raw weights, x1.5; layer 0 dense.
    "glm4_moe": dict(
        config="Glm4MoeConfig", model="Glm4MoeForCausalLM", fused=True, seed=5,
        hf=dict(intermediate_size=40, moe_intermediate_size=8, num_hidden_layers=3, head_dim=12,
                n_routed_experts=8, n_shared_experts=1, n_group=1, topk_group=1,
                routed_scaling_factor=1.5, norm_topk_prob=False, first_k_dense_replace=1,
                attention_bias=True, use_qk_norm=True, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5},
                tie_word_embeddings=False)),
}


def redraw(model, seed):
  """Weights that make mistakes visible (see the module docstring)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      elif "embed_tokens" in name:
        p.copy_(0.01 * noise)
      else:                                   # [out, in] linears; fused experts [E, out, in]
        scale = p.shape[-1] ** -0.5
        if any(k in name for k in ("o_proj", "down_proj", "w2")):
          scale *= 4.0
        elif name.endswith("gate.weight") and p.shape[0] == num_experts(model.config):
          scale *= 3.0                        # the router
        p.copy_(scale * noise)
      p.copy_(p.to(torch.bfloat16).float())   # saved as bf16 (half the bytes), exactly
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):   # selection-only: make it matter
        b.copy_((0.2 * torch.randn(b.shape, generator=gen)).to(torch.bfloat16).float())


def num_experts(config):
  return getattr(config, "num_local_experts", None) or config.num_experts


def make_inputs(spec, vocab_size):
  rng = np.random.default_rng(100 + spec["seed"])
  input_ids = rng.integers(3, vocab_size, (len(LEFT_PADS), PROMPT))
  mask = np.ones_like(input_ids)
  for row, pads in enumerate(LEFT_PADS):
    mask[row, :pads] = 0
  return np.where(mask == 1, input_ids, 0), mask


def routers(model):
  return [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]


def margin(values, k):
  """Smallest gap among the top k + 1 sorted values along the last axis."""
  top = torch.sort(values, dim=-1, descending=True).values[..., :k + 1]
  return float((top[..., :-1] - top[..., 1:]).min())


def routing_margin(router, logits, k):
  """Smallest gap of the router's selection: softmax top-k, or, for sigmoid routers, the groups'
  scores (sum of their 2 best biased scores) and the biased scores within the kept groups."""
  if not hasattr(router, "e_score_correction_bias"):
    return margin(torch.softmax(logits.float(), -1), k)
  choice = torch.sigmoid(logits.float()) + router.e_score_correction_bias
  groups = choice.view(-1, router.num_group, choice.shape[-1] // router.num_group)
  group_scores = groups.topk(2, dim=-1)[0].sum(-1)
  gaps = [margin(group_scores, router.topk_group)] if router.num_group > 1 else []
  keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(router.topk_group)[1], 1)
  masked = choice.masked_fill(~keep.bool().repeat_interleave(groups.shape[-1], 1), -1e9)
  return min(gaps + [margin(masked, k)])


def record_forward(model, input_ids, mask):
  captured = []
  hooks = [r.register_forward_hook(lambda m, a, out: captured.append(out)) for r in routers(model)]
  with torch.no_grad():
    out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                output_router_logits=True)
  for h in hooks:
    h.remove()
  batch, length = input_ids.shape
  k = model.config.num_experts_per_tok
  ref, margins = {"logits": out.logits.numpy()}, []
  if out.aux_loss is not None:                # DeepSeek and GLM compute none at inference
    ref["aux_loss"] = np.float32(float(out.aux_loss))
  real = torch.tensor(mask.reshape(-1) == 1)
  for j, (logits, weights, index) in enumerate(captured):
    ref[f"moe{j}_router_logits"] = logits.reshape(batch, length, -1).numpy()
    ref[f"moe{j}_expert_weight"] = weights.reshape(batch, length, k).numpy()
    ref[f"moe{j}_expert_index"] = index.reshape(batch, length, k).numpy()
    margins.append(routing_margin(routers(model)[j], logits[real], k))
  return ref, min(margins)


def greedy(model, input_ids, mask, use_cache, **eos):
  """(tokens [B, P + N] right-filled with the pad id, smallest top-1 margin of live rows,
  smallest routing margin over the decode steps)."""
  captured = []
  hooks = [r.register_forward_hook(lambda m, a, out: captured.append(out[0]))
           for r in routers(model)]
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                         use_cache=use_cache, return_dict_in_generate=True, output_logits=True,
                         **eos)
  for h in hooks:
    h.remove()
  pad = model.generation_config.pad_token_id
  if pad is None:
    eos_ids = model.generation_config.eos_token_id
    pad = eos_ids if isinstance(eos_ids, int) else (eos_ids or [0])[0]
  tokens = out.sequences.numpy()
  full = np.full((tokens.shape[0], PROMPT + NEW_TOKENS), pad, np.int64)
  full[:, :tokens.shape[1]] = tokens
  eos_id = eos.get("eos_token_id", model.generation_config.eos_token_id)
  top1 = min(margin(step[row], 1) for i, step in enumerate(out.logits)
             for row in range(step.shape[0]) if not _done_before(full, row, i, eos_id))
  k = model.config.num_experts_per_tok
  mods = routers(model)
  decode_steps = list(enumerate(captured))[len(mods):] if use_cache else []
  route = min([routing_margin(mods[i % len(mods)], lg, k) for i, lg in decode_steps] or [1.0])
  return full, top1, route


def _done_before(tokens, row, step, eos_id):
  if eos_id is None:
    return False
  return bool(np.isin(tokens[row, PROMPT:PROMPT + step], np.atleast_1d(eos_id)).any())


def pick_eos(tokens):
  """A generated token no row emits in its first two steps that ends the most rows mid-way
  (fallback: row 0's last token), so rows stop at different times."""
  new = tokens[:, PROMPT:]
  best, best_rows = int(new[0, -1]), 0
  for token in np.unique(new):
    firsts = [list(row).index(token) for row in new if token in row]
    if min(firsts) >= 2 and len(firsts) > best_rows:
      best, best_rows = int(token), len(firsts)
  return best


def build(spec, seed):
  config = getattr(transformers, spec["config"])(**{**COMMON, **spec["hf"]})
  model = getattr(transformers, spec["model"])(config).eval()
  redraw(model, seed)
  return model


def make_fixture(name, spec):
  for attempt in range(50):
    seed = spec["seed"] * 1000 + attempt
    model = build(spec, seed)
    input_ids, mask = make_inputs(spec, model.config.vocab_size)
    ref, route_margin = record_forward(model, input_ids, mask)
    free, top1, gen_route = greedy(model, input_ids, mask, True, eos_token_id=None)
    eos = pick_eos(free)
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    cached, top1_eos, _ = greedy(model, input_ids, mask, True)
    if min(route_margin, top1, gen_route, top1_eos) >= MARGIN:
      break
    print(f"{name}: seed {seed} rejected (margins: routing {route_margin:.1e}, greedy "
          f"{top1:.1e}, decode routing {gen_route:.1e})")
  else:
    raise RuntimeError(f"{name}: no seed without near ties")
  uncached, _, _ = greedy(model, input_ids, mask, False)
  assert np.isfinite(ref["logits"]).all()
  out = os.path.join(OUT_DIR, name)
  model.to(torch.bfloat16).save_pretrained(out, save_original_format=not spec["fused"])
  ref.update(input_ids=input_ids, attention_mask=mask, gen_cached=cached, gen_uncached=uncached,
             gen_no_eos=free, eos_token_id=np.int64(eos), max_new_tokens=np.int64(NEW_TOKENS))
  np.savez_compressed(os.path.join(out, "reference.npz"), **ref)
  print(f"{name}: seed {seed}, eos {eos}, routing margin {route_margin:.2e}, greedy margin "
        f"{min(top1, top1_eos):.2e}, cached == uncached: {np.array_equal(cached, uncached)}\n"
        f"  cached {cached[:, PROMPT:].tolist()}\n  no eos {free[:, PROMPT:].tolist()}")


def main():
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  os.makedirs(OUT_DIR, exist_ok=True)
  torch.set_num_threads(1)
  names = sys.argv[1:] or list(SPECS)
  unknown = sorted(set(names) - set(SPECS))
  if unknown:
    raise SystemExit(f"unknown fixtures {unknown}; known: {sorted(SPECS)}")
  for name in names:
    make_fixture(name, SPECS[name])
  with open(os.path.join(OUT_DIR, "VERSIONS.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__}, f)
    f.write("\n")


if __name__ == "__main__":
  main()
