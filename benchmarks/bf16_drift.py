"""How far moe_jax in bfloat16 drifts from float32 on the peer model.

  python benchmarks/bf16_drift.py [--setup=8:4 --batch=4x64 --new_tokens=32]

The model is the one benchmarks/peer_switch.py builds (HF SwitchTransformers, torch init, seeded;
switch-base widths; "E:L" = E experts, L + L layers), saved with `save_pretrained` and loaded into
moe_jax twice: float32, and bfloat16 (every parameter and activation bf16, except the router
kernels, kept float32; routing is computed in float32 either way). Reported:
  * teacher-forced logits: max and mean abs diff bf16 vs f32 (and the f32 logits' scale);
  * top-1 agreement of those logits per position;
  * routing: fraction of tokens whose expert differs (encoder and decoder sparse blocks);
  * greedy cached generation: per-row first divergence and the fraction of equal tokens.
With --hf (default) the same is measured for transformers' own bf16 model against its f32 model,
as a yardstick for what bf16 costs any implementation.

Results: stdout and benchmarks/results/bf16_drift_<date>_<host>.json.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import shutil  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import peer_switch  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("setup", "8:4", "experts:layers per stack")
flags.DEFINE_string("batch", "4x64", "BxL source batch")
flags.DEFINE_integer("target_length", 32, "teacher-forced decoder length")
flags.DEFINE_integer("new_tokens", 32, "greedy steps")
flags.DEFINE_bool("hf", True, "also measure transformers' bf16 vs f32")
flags.DEFINE_integer("capacity", 4096, "expert_capacity (>= every length: no drops)")


def bf16_params(params):
  """Every leaf in bfloat16 except the sparse blocks' router kernels (kept float32)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def cast(path, leaf):
    name = getattr(path[-1], "key", None)
    return leaf.astype(jnp.float32 if name == "router" else jnp.bfloat16)
  return jax.tree_util.tree_map_with_path(cast, params)


def logits_drift(want: np.ndarray, got: np.ndarray) -> dict:
  diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
  return {"logits_max_abs_diff": float(diff.max()), "logits_mean_abs_diff": float(diff.mean()),
          "logits_max_abs": float(np.abs(want).max()),
          "logits_mean_abs": float(np.abs(want).mean()),
          "top1_agreement": float(np.mean(np.argmax(want, -1) == np.argmax(got, -1)))}


def greedy_agreement(want: np.ndarray, got: np.ndarray) -> dict:
  """Token agreement of two [B, 1 + N] greedy outputs (column 0 is the start token)."""
  width = min(want.shape[1], got.shape[1])
  equal = want[:, 1:width] == got[:, 1:width]
  first = [int(np.argmin(row)) if not row.all() else None for row in equal]
  return {"greedy_equal_fraction": float(equal.mean()), "greedy_rows_identical":
          int(sum(f is None for f in first)), "greedy_rows": int(equal.shape[0]),
          "greedy_first_divergence_per_row": first}


def routing_flips(out32, out16) -> dict:
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  flips = {}
  for stack in switch.STACKS:
    a = [np.asarray(r.expert_index) for r in getattr(out32.router, stack)]
    b = [np.asarray(r.expert_index) for r in getattr(out16.router, stack)]
    if a:
      flips[f"{stack}_routing_changed_fraction"] = float(np.mean(
          np.concatenate([x.ravel() for x in a]) != np.concatenate([y.ravel() for y in b])))
  return flips


def moe_jax_drift(model32, model16, input_ids, mask, decoder_ids, new_tokens) -> dict:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  out32 = model32(input_ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                  output_router=True)
  out16 = model16(input_ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                  output_router=True)
  result = logits_drift(np.asarray(out32.logits, np.float32), np.asarray(out16.logits, np.float32))
  result.update(routing_flips(out32, out16))
  ids, am = jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  tokens32 = np.asarray(model32.generate(ids, am, max_new_tokens=new_tokens, eos_token_id=-1))
  tokens16 = np.asarray(model16.generate(ids, am, max_new_tokens=new_tokens, eos_token_id=-1))
  result.update(greedy_agreement(tokens32, tokens16))
  return result


def hf_drift(hf_model, input_ids, mask, decoder_ids, new_tokens) -> dict:
  import copy  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  hf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
  want, _ = peer_switch.hf_logits(hf_model, input_ids, mask, decoder_ids)
  got, _ = peer_switch.hf_logits(hf16, input_ids, mask, decoder_ids)
  result = logits_drift(want, got)
  tokens32 = peer_switch.hf_generate(hf_model, input_ids, mask, new_tokens)().numpy()
  tokens16 = peer_switch.hf_generate(hf16, input_ids, mask, new_tokens)().numpy()
  result.update(greedy_agreement(tokens32, tokens16))
  return result


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  setup = peer_switch.parse_setups(FLAGS.setup)[0]
  batch, length = peer_switch.parse_batches(FLAGS.batch)[0]
  hf_model = peer_switch.build_hf_model(setup, capacity=FLAGS.capacity)
  directory = tempfile.mkdtemp(prefix="bf16_drift_")
  try:
    model32 = peer_switch.save_and_load(hf_model, directory)
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  model16 = switch.SwitchModel(model32.config, bf16_params(model32.params))
  vocab = model32.config.vocab_size
  input_ids, mask = peer_switch.random_inputs(batch, length, vocab, seed=5)
  decoder_ids = np.random.default_rng(6).integers(2, vocab, (batch, FLAGS.target_length))
  decoder_ids[:, 0] = 0
  result = {"setup": setup.name, "batch": FLAGS.batch, "target_length": FLAGS.target_length,
            "new_tokens": FLAGS.new_tokens,
            "moe_jax_bf16_vs_f32": moe_jax_drift(model32, model16, input_ids, mask, decoder_ids,
                                                 FLAGS.new_tokens)}
  if FLAGS.hf:
    result["hf_bf16_vs_f32"] = hf_drift(hf_model, input_ids, mask, decoder_ids, FLAGS.new_tokens)
  for name in ("moe_jax_bf16_vs_f32", "hf_bf16_vs_f32"):
    if name in result:
      r = result[name]
      print(f"{name}: logits max |diff| {r['logits_max_abs_diff']:.3f} mean "
            f"{r['logits_mean_abs_diff']:.4f} (f32 logits max {r['logits_max_abs']:.1f}, mean "
            f"{r['logits_mean_abs']:.2f}); top-1 agreement {r['top1_agreement']:.3f}; greedy "
            f"tokens equal {r['greedy_equal_fraction']:.3f}, identical rows "
            f"{r['greedy_rows_identical']}/{r['greedy_rows']}, first divergence "
            f"{r['greedy_first_divergence_per_row']}"
            + "".join(f"; {k} {v:.4f}" for k, v in r.items() if k.endswith("changed_fraction")))
  path = peer_switch.write_result("bf16_drift", {"flags": {
      k: getattr(FLAGS, k) for k in ("setup", "batch", "target_length", "new_tokens", "hf",
                                     "capacity")}, "jax_backend": jax.default_backend(),
      **result})
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
