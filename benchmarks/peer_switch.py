"""Side by side: Hugging Face `SwitchTransformersForConditionalGeneration` vs moe_jax's Switch.

  pip install -e ".[peer]"          # torch + transformers (never needed by the tests)
  python benchmarks/peer_switch.py --setups=8:4,32:4,128:2 --batches=1x128,8x128

For every setup "E:L" (E experts, L encoder + L decoder layers, every second one sparse, switch-base
widths d_model 768, d_ff 3072, d_kv 64, 12 heads, vocab 32128):
  1. build the HF model with torch's init (seeded), save it with `save_pretrained` (safetensors)
     into a temp dir, and load that dir with `moe_jax.models.switch.from_pretrained`;
  2. check agreement first: encoder hidden states and teacher-forced logits (max abs diff), and
     cached greedy generation (token equality). No time is reported for a setup that disagrees;
  3. time, in interleaved rounds (medians): encoder forward tokens/s at each batch, and cached
     greedy generation new tokens/s (start token, then --new_tokens steps, eos disabled).

`expert_capacity` is set to --capacity (default 4096) >= every sequence length, so HF's
per-sequence capacity can never drop a token and both sides are dropless (HF has no "None"
capacity: its router compares `priority <= expert_capacity`).

Fairness to the peer: torch's OpenMP threads spin while they wait, and on a shared 2-core machine a
descheduled spinning thread slowed HF up to 9x in our runs; OMP_WAIT_POLICY=PASSIVE (set below
unless the environment sets it) removes that. HF is timed at every --hf_threads count and the
faster one is its figure (all are recorded).

Results go to benchmarks/results/peer_switch_<date>_<host>.json (and a table on stdout). The
helpers here (the model pair, inputs, both sides' callables) are reused by bf16_drift.py and
gpu_check.py; result files and interleaved timing live in bench_io.py (re-exported here).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see above)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dataclasses  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

import roofline  # noqa: E402  (this directory is on sys.path when run as a script)
from bench_io import interleaved_medians  # noqa: E402
from bench_io import write_result  # noqa: E402,F401  (the other scripts call peer_switch's)

SWITCH_BASE = dict(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12)


# --- the model pair ---


@dataclasses.dataclass
class Setup:
  """One model shape: E experts, `layers` blocks per stack (every second block sparse)."""

  num_experts: int
  layers: int

  @property
  def name(self) -> str:
    return f"E{self.num_experts}_L{self.layers}+{self.layers}"


def parse_setups(text: str) -> list[Setup]:
  """"8:4,128:2" -> [Setup(8, 4), Setup(128, 2)]."""
  setups = []
  for item in text.split(","):
    experts, _, layers = item.partition(":")
    if not layers:
      raise ValueError(f"setup {item!r} must be 'experts:layers', e.g. '32:4'.")
    setups.append(Setup(int(experts), int(layers)))
  return setups


def parse_batches(text: str) -> list[tuple[int, int]]:
  """"1x128,8x128" -> [(1, 128), (8, 128)]."""
  out = []
  for item in text.split(","):
    batch, _, length = item.partition("x")
    if not length:
      raise ValueError(f"batch {item!r} must be 'BxL', e.g. '8x128'.")
    out.append((int(batch), int(length)))
  return out


def hf_config(setup: Setup, *, capacity: int, widths: dict | None = None):
  """A `SwitchTransformersConfig` of switch-base widths (or `widths`), no dropout."""
  from transformers import SwitchTransformersConfig  # pylint: disable=import-outside-toplevel
  sparse = max(setup.layers // 2, 1)
  return SwitchTransformersConfig(
      **(widths or SWITCH_BASE), num_layers=setup.layers, num_decoder_layers=setup.layers,
      num_sparse_encoder_layers=sparse, num_sparse_decoder_layers=sparse,
      num_experts=setup.num_experts, expert_capacity=capacity, dropout_rate=0.0,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def build_hf_model(setup: Setup, *, capacity: int, seed: int = 0, widths: dict | None = None):
  """A random HF Switch model in eval mode (torch's init; norms and position biases perturbed)."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import SwitchTransformersForConditionalGeneration  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = SwitchTransformersForConditionalGeneration(
      hf_config(setup, capacity=capacity, widths=widths)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(0.5 * torch.randn_like(p))
  model.generation_config.eos_token_id = None  # fixed-length generation in the benchmark
  return model


def save_and_load(hf_model, directory: str, *, dtype=None, execution=None):
  """`save_pretrained(directory)` (safetensors), then moe_jax's `switch.from_pretrained`
  (`execution`: a `moe_jax.ExecutionConfig`, None for the default)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  hf_model.save_pretrained(directory, safe_serialization=True)
  return switch.from_pretrained(directory, dtype=dtype or jnp.float32, execution=execution)


def random_inputs(batch: int, length: int, vocab: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(2, vocab, (batch, length)).astype(np.int64)
  return input_ids, np.ones((batch, length), np.int64)


# --- the two sides' callables ---


def hf_encoder(model, input_ids, attention_mask):
  import torch  # pylint: disable=import-outside-toplevel
  ids, mask = torch.tensor(input_ids), torch.tensor(attention_mask)

  def run():
    with torch.inference_mode():
      return model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
  return run


def hf_logits(model, input_ids, attention_mask, decoder_input_ids):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.inference_mode():
    out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                decoder_input_ids=torch.tensor(decoder_input_ids))
  return out.logits.float().numpy(), out.encoder_last_hidden_state.float().numpy()


def hf_generate(model, input_ids, attention_mask, new_tokens: int):
  import torch  # pylint: disable=import-outside-toplevel
  ids, mask = torch.tensor(input_ids), torch.tensor(attention_mask)

  def run():
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=0, do_sample=False, num_beams=1, use_cache=True,
                            eos_token_id=None, pad_token_id=0, decoder_start_token_id=0)
  return run


def jax_encoder(model, input_ids, attention_mask):
  """A jitted moe_jax encoder call on fixed inputs: () -> <f>[B, L, d]."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  encode = jax.jit(lambda p, ids, mask: switch.prompt_pass(p, model.config, ids, mask,
                                                           model.moe_fn))
  ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
  return lambda: jax.block_until_ready(encode(model.params, ids, mask))


def jax_logits(model, input_ids, attention_mask, decoder_input_ids):
  out = model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
  return (np.asarray(out.logits, np.float32),
          np.asarray(out.encoder_last_hidden_state.astype("float32")))


def jax_generate(model, input_ids, attention_mask, new_tokens: int):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
  return lambda: jax.block_until_ready(
      model.generate(ids, mask, max_new_tokens=new_tokens, use_cache=True, eos_token_id=-1))


# --- agreement ---


def agreement(hf_model, jax_model, *, batch: int, length: int, new_tokens: int,
              target_length: int = 16) -> dict:
  """Max abs diffs of encoder hidden states and logits, and greedy token equality."""
  vocab = jax_model.config.vocab_size
  input_ids, mask = random_inputs(batch, length, vocab)
  rng = np.random.default_rng(2)
  decoder_ids = rng.integers(2, vocab, (batch, target_length)).astype(np.int64)
  decoder_ids[:, 0] = 0
  hf_out, hf_hidden = hf_logits(hf_model, input_ids, mask, decoder_ids)
  jx_out, jx_hidden = jax_logits(jax_model, input_ids, mask, decoder_ids)
  hf_tokens = hf_generate(hf_model, input_ids, mask, new_tokens)().numpy()
  jx_tokens = np.asarray(jax_generate(jax_model, input_ids, mask, new_tokens)())
  same = hf_tokens.shape == jx_tokens.shape and bool(np.array_equal(hf_tokens, jx_tokens))
  first_diff = None
  if not same:
    width = min(hf_tokens.shape[1], jx_tokens.shape[1])
    differ = np.argwhere(hf_tokens[:, :width] != jx_tokens[:, :width])
    first_diff = differ[0].tolist() if len(differ) else "shape"
  return {
      "batch": batch, "length": length, "target_length": target_length,
      "encoder_hidden_max_abs_diff": float(np.max(np.abs(hf_hidden - jx_hidden))),
      "encoder_hidden_max_abs": float(np.max(np.abs(hf_hidden))),
      "logits_max_abs_diff": float(np.max(np.abs(hf_out - jx_out))),
      "logits_max_abs": float(np.max(np.abs(hf_out))),
      "greedy_tokens_equal": same, "greedy_first_difference": first_diff,
      "greedy_new_tokens": new_tokens,
  }


def agrees(check: dict, tolerance: float) -> bool:
  scale = max(check["logits_max_abs"], 1.0)
  hidden_scale = max(check["encoder_hidden_max_abs"], 1.0)
  return (check["greedy_tokens_equal"] and check["logits_max_abs_diff"] <= tolerance * scale
          and check["encoder_hidden_max_abs_diff"] <= tolerance * hidden_scale)


# --- one setup ---


def with_threads(fn, threads: int):
  """fn run with torch.set_num_threads(threads) (restored afterwards)."""
  import torch  # pylint: disable=import-outside-toplevel

  def run():
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
      return fn()
    finally:
      torch.set_num_threads(before)
  return run


def hf_contenders(make, threads: tuple[int, ...]) -> dict:
  return {f"hf@{t}": with_threads(make(), t) for t in threads}


def timing_row(what, batch_text, medians, produced) -> dict:
  """One table row: the best HF thread count against moe_jax."""
  hf_runs = {k: v for k, v in medians.items() if k.startswith("hf@")}
  best = min(hf_runs, key=hf_runs.get)
  return {"what": what, "batch": batch_text, "hf_s": hf_runs[best], "hf_best": best,
          "hf_all_s": hf_runs, "moe_jax_s": medians["moe_jax"],
          "hf_tok_s": produced / hf_runs[best], "moe_jax_tok_s": produced / medians["moe_jax"],
          "speedup": hf_runs[best] / medians["moe_jax"]}


def run_setup(setup: Setup, *, batches, gen_batch, new_tokens, rounds, capacity, tolerance,
              execution=None, hf_threads=(1, 2), log=print) -> dict:
  import gc  # pylint: disable=import-outside-toplevel
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  result = {"setup": setup.name, "num_experts": setup.num_experts, "layers": setup.layers}
  directory = tempfile.mkdtemp(prefix="peer_switch_")
  try:
    hf_model = build_hf_model(setup, capacity=capacity)
    jax_model = save_and_load(hf_model, directory, execution=execution)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  result["sparse_blocks"] = {s: list(jax_model.config.sparse_blocks(s)) for s in switch.STACKS}
  gen_batch_size, gen_length = gen_batch
  check = agreement(hf_model, jax_model, batch=gen_batch_size, length=gen_length,
                    new_tokens=new_tokens)
  result["agreement"] = check
  log(f"{setup.name}: encoder |diff| {check['encoder_hidden_max_abs_diff']:.2e} "
      f"(max {check['encoder_hidden_max_abs']:.1f}), logits |diff| "
      f"{check['logits_max_abs_diff']:.2e} (max {check['logits_max_abs']:.1f}), greedy tokens "
      f"equal: {check['greedy_tokens_equal']}")
  if not agrees(check, tolerance):
    result["skipped"] = "outputs disagree; no times reported"
    log(f"{setup.name}: outputs disagree, not timing it")
    return result
  rows, hit = [], []
  for batch, length in batches:
    input_ids, mask = random_inputs(batch, length, jax_model.config.vocab_size, seed=3)
    contenders = hf_contenders(lambda: hf_encoder(hf_model, input_ids, mask), hf_threads)
    contenders["moe_jax"] = jax_encoder(jax_model, input_ids, mask)
    medians = interleaved_medians(contenders, rounds)
    rows.append(timing_row("encoder forward", f"{batch}x{length}", medians, batch * length))
    log(_row_text(setup, rows[-1]))
    hit.append(roofline.encoder_experts_hit(jax_model, input_ids, mask))
  input_ids, mask = random_inputs(gen_batch_size, gen_length, jax_model.config.vocab_size, seed=4)
  contenders = hf_contenders(lambda: hf_generate(hf_model, input_ids, mask, new_tokens),
                             hf_threads)
  contenders["moe_jax"] = jax_generate(jax_model, input_ids, mask, new_tokens)
  medians = interleaved_medians(contenders, max(rounds // 2, 2))
  rows.append(timing_row(f"cached greedy generation ({new_tokens} new)",
                         f"{gen_batch_size}x{gen_length}", medians, gen_batch_size * new_tokens))
  log(_row_text(setup, rows[-1]))
  result["timings"] = rows
  roofline.add_bounds(result, jax_model, batches, hit, gen_batch, new_tokens, log)
  del hf_model, jax_model
  gc.collect()
  return result


def _row_text(setup, row):
  return (f"{setup.name:14s} {row['what']:38s} {row['batch']:>7s} HF({row['hf_best']}) "
          f"{row['hf_tok_s']:9.1f} tok/s  moe_jax {row['moe_jax_tok_s']:9.1f} tok/s  "
          f"x{row['speedup']:.2f}")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  import torch  # pylint: disable=import-outside-toplevel
  from moe_jax.config import ExecutionConfig  # pylint: disable=import-outside-toplevel
  hf_threads = tuple(int(t) for t in f.hf_threads.split(","))
  setups = parse_setups(f.setups)
  batches = parse_batches(f.batches)
  gen_batch = parse_batches(f.gen_batch)[0]
  results = []
  for setup in setups:
    results.append(run_setup(setup, batches=batches, gen_batch=gen_batch,
                             new_tokens=f.new_tokens, rounds=f.rounds, capacity=f.capacity,
                             tolerance=f.tolerance,
                             execution=ExecutionConfig(gmm_backend=f.gmm_backend),
                             hf_threads=hf_threads))
  path = write_result("peer_switch", {
      "flags": {k: getattr(f, k) for k in ("setups", "batches", "gen_batch", "new_tokens",
                                           "rounds", "capacity", "tolerance", "gmm_backend",
                                           "hf_threads")},
      "torch_default_threads": torch.get_num_threads(),
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "results": results})
  print(f"wrote {path}")


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("setups", "8:4,32:4,128:2", "comma-separated experts:layers per stack")
  flags.DEFINE_string("batches", "1x128,8x128", "encoder batches BxL")
  flags.DEFINE_string("gen_batch", "8x128", "generation batch BxL (source)")
  flags.DEFINE_integer("new_tokens", 32, "greedy steps")
  flags.DEFINE_integer("rounds", 5, "timed interleaved rounds")
  flags.DEFINE_integer("capacity", 4096, "expert_capacity (>= every length: no drops)")
  flags.DEFINE_float("tolerance", 1e-4, "max abs diff / max abs value allowed before timing")
  flags.DEFINE_string("hf_threads", "1,2", "torch thread counts to time HF at (best is used)")
  flags.DEFINE_string("gmm_backend", "auto", "moe_jax grouped-matmul backend")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
