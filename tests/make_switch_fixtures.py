"""Builds the tiny Hugging Face Switch fixtures that tests/test_switch_model.py compares against.

Needs torch and transformers (5.24.0 was used); the tests themselves do not. Run from the repo root:

  python tests/make_switch_fixtures.py

For each spec below it builds a random `SwitchTransformersForConditionalGeneration`, saves it with
`save_pretrained` (config.json, generation_config.json, model.safetensors) into
tests/fixtures/switch/<name>/ and records, in float32 eval mode, into <name>/reference.npz:
  inputs: input_ids, attention_mask (with padding), decoder_input_ids;
  logits, encoder_hidden, decoder_hidden (decoder output after its final norm);
  per sparse block ("enc{i}_"/"dec{i}_" prefixes, i counting sparse blocks): expert_index (before
    capacity), dispatched, router_prob, router_logits;
  encoder/decoder z and aux losses;
  greedy generations with and without the KV cache (gen_cached, gen_uncached), right-padded with
    pad_token_id to 1 + max_new_tokens columns, and the eos id they used.
It also writes buckets.npz: HF's relative position buckets for a range of relative positions.
"""

import json
import os

import numpy as np
import torch
import transformers
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.models.switch_transformers import modeling_switch_transformers as hf_switch

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "switch")

COMMON = dict(vocab_size=96, d_model=16, d_ff=32, d_kv=8, num_heads=4, num_experts=8,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)

SPECS = {
    # Step 2 in both stacks (sparse blocks 1, 3), no capacity drops, small bucket range.
    "tied_step2": dict(
        hf=dict(num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
                num_sparse_decoder_layers=2, expert_capacity=64,
                relative_attention_num_buckets=8, relative_attention_max_distance=20),
        batch=4, source_length=13, target_length=7, max_new_tokens=9, left_pad_rows=(), seed=0),
    # Capacity 2 per sequence and expert: drops many tokens; one row is left-padded, so padding
    # uses capacity ahead of real tokens. Step 3 in both stacks (3 layers, 1 sparse -> block 1).
    # (HF's cached generate sizes its cache by num_layers, so it fails with
    # num_decoder_layers > num_layers; every spec here keeps the decoder no deeper.)
    "capacity_drops": dict(
        hf=dict(num_layers=3, num_decoder_layers=3, num_sparse_encoder_layers=1,
                num_sparse_decoder_layers=1, expert_capacity=2, d_kv=4, num_heads=2,
                relative_attention_num_buckets=16, relative_attention_max_distance=32),
        batch=4, source_length=20, target_length=12, max_new_tokens=12, left_pad_rows=(3,),
        seed=1),
    # Explicit encoder_sparse_step=3 (6 layers -> sparse 1, 4; the derived step would be 6 -> 1
    # only); decoder step 1 (every block sparse; HF then reports zero decoder losses).
    "step3_explicit": dict(
        hf=dict(num_layers=6, num_decoder_layers=3, num_sparse_encoder_layers=1,
                encoder_sparse_step=3, num_sparse_decoder_layers=3, expert_capacity=4),
        batch=2, source_length=11, target_length=6, max_new_tokens=8, left_pad_rows=(), seed=2),
    # Untied head and embeddings; decoder num_sparse_decoder_layers=0 with 2 layers (the quirk:
    # step = 2, so block 1 is still sparse).
    "untied": dict(
        hf=dict(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                num_sparse_decoder_layers=0, expert_capacity=3, tie_word_embeddings=False,
                relative_attention_num_buckets=8, relative_attention_max_distance=16),
        batch=2, source_length=9, target_length=5, max_new_tokens=7, left_pad_rows=(), seed=3),
}


def build_model(spec):
  torch.manual_seed(spec["seed"])
  config = SwitchTransformersConfig(**{**COMMON, **spec["hf"]})
  model = SwitchTransformersForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))         # non-trivial norm weights
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))                       # position bias that matters
    if not config.tie_word_embeddings:                     # four distinct tables
      for module in (model.shared, model.encoder.embed_tokens, model.decoder.embed_tokens,
                     model.lm_head):
        module.weight.copy_(torch.randn_like(module.weight))
  return model


def make_inputs(spec, vocab_size):
  rng = np.random.default_rng(100 + spec["seed"])
  batch, source_length = spec["batch"], spec["source_length"]
  input_ids = rng.integers(2, vocab_size, (batch, source_length))
  attention_mask = np.ones((batch, source_length), np.int64)
  for row in range(1, batch):
    pad = 2 * row + 1
    if row in spec["left_pad_rows"]:
      attention_mask[row, :pad] = 0
    else:
      attention_mask[row, source_length - pad:] = 0
  input_ids = np.where(attention_mask == 1, input_ids, 0)
  decoder_input_ids = rng.integers(2, vocab_size, (batch, spec["target_length"]))
  decoder_input_ids[:, 0] = 0
  return input_ids, attention_mask, decoder_input_ids


def sparse_routers(model):
  """[(prefix, router module)] for every sparse block, encoder first, in block order."""
  routers = []
  for tag, stack in (("enc", model.encoder), ("dec", model.decoder)):
    sparse = [b for b in stack.block if b.is_sparse]
    routers += [(f"{tag}{i}_", b.layer[-1].mlp.router) for i, b in enumerate(sparse)]
  return routers


def record_forward(model, input_ids, attention_mask, decoder_input_ids):
  captured = {}
  hooks = []
  for prefix, router in sparse_routers(model):
    def hook(module, args, outputs, prefix=prefix):
      dispatch, probs, logits = outputs
      full_probs = torch.softmax(logits.float(), dim=-1)
      captured[prefix + "expert_index"] = torch.argmax(full_probs, dim=-1).numpy()
      captured[prefix + "dispatched"] = (dispatch.sum(-1) > 0).numpy()
      captured[prefix + "router_prob"] = probs[..., 0].numpy()
      captured[prefix + "router_logits"] = logits.numpy()
    hooks.append(router.register_forward_hook(hook))
  hooks.append(model.decoder.final_layer_norm.register_forward_hook(
      lambda m, a, out: captured.__setitem__("decoder_hidden", out.numpy())))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                decoder_input_ids=torch.tensor(decoder_input_ids), output_router_logits=True)
  for h in hooks:
    h.remove()
  captured["logits"] = out.logits.numpy()
  captured["encoder_hidden"] = out.encoder_last_hidden_state.numpy()
  for name in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
    captured[name] = np.float32(float(getattr(out, name)))
  return captured


def greedy(model, input_ids, attention_mask, max_new_tokens, use_cache, eos_token_id):
  with torch.no_grad():
    tokens = model.generate(
        input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=use_cache,
        eos_token_id=eos_token_id, pad_token_id=0, decoder_start_token_id=0).numpy()
  full = np.zeros((tokens.shape[0], max_new_tokens + 1), np.int64)
  full[:, :tokens.shape[1]] = tokens
  return full


def pick_eos(tokens):
  """A token that row 0 first emits mid-way, so that row stops early and others may not."""
  row = list(tokens[0, 1:])
  for i in range(2, len(row)):
    if row[i] not in row[:i]:
      return int(row[i])
  return 1


def make_fixture(name, spec):
  model = build_model(spec)
  out = os.path.join(OUT_DIR, name)
  model.save_pretrained(out)
  input_ids, attention_mask, decoder_input_ids = make_inputs(spec, model.config.vocab_size)
  ref = record_forward(model, input_ids, attention_mask, decoder_input_ids)
  n = spec["max_new_tokens"]
  eos = pick_eos(greedy(model, input_ids, attention_mask, n, True, eos_token_id=1))
  ref["gen_cached"] = greedy(model, input_ids, attention_mask, n, True, eos)
  ref["gen_uncached"] = greedy(model, input_ids, attention_mask, n, False, eos)
  ref.update(input_ids=input_ids, attention_mask=attention_mask,
             decoder_input_ids=decoder_input_ids, eos_token_id=np.int64(eos),
             max_new_tokens=np.int64(n))
  np.savez_compressed(os.path.join(out, "reference.npz"), **ref)
  drops = sum(int((~v).sum()) for k, v in ref.items() if k.endswith("dispatched"))
  differ = int((ref["gen_cached"] != ref["gen_uncached"]).sum())
  print(f"{name}: sparse enc {[i for i, b in enumerate(model.encoder.block) if b.is_sparse]} "
        f"dec {[i for i, b in enumerate(model.decoder.block) if b.is_sparse]}, dropped tokens "
        f"{drops}, eos {eos}, cached/uncached differ at {differ} positions\n"
        f"  cached   {ref['gen_cached'].tolist()}\n  uncached {ref['gen_uncached'].tolist()}")


def make_buckets():
  relative = torch.arange(-400, 401)[None, :]
  tables = {"relative_position": relative[0].numpy()}
  for num_buckets, max_distance in ((32, 128), (8, 20), (16, 32), (64, 256)):
    for bidirectional in (True, False):
      buckets = hf_switch.SwitchTransformersAttention._relative_position_bucket(
          relative, bidirectional=bidirectional, num_buckets=num_buckets,
          max_distance=max_distance)
      key = f"{'bi' if bidirectional else 'uni'}_{num_buckets}_{max_distance}"
      tables[key] = buckets[0].numpy()
  np.savez_compressed(os.path.join(OUT_DIR, "buckets.npz"), **tables)


def main():
  print(f"transformers {transformers.__version__}, torch {torch.__version__}")
  os.makedirs(OUT_DIR, exist_ok=True)
  torch.set_num_threads(1)
  for name, spec in SPECS.items():
    make_fixture(name, spec)
  make_buckets()
  with open(os.path.join(OUT_DIR, "VERSIONS.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__}, f)
    f.write("\n")


if __name__ == "__main__":
  main()
