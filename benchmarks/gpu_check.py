"""One-shot GPU check (designed for one H200, under 8 minutes), also runnable on CPU with --smoke.

  bash benchmarks/gpu_check.sh                   # on the GPU machine (writes benchmarks/results/)
  python benchmarks/gpu_check.py --smoke --out_dir=/tmp/x    # tiny shapes on CPU, ~30 s

Four parts, each guarded so one failure still leaves the others' results:
  (a) grouped matmul: the expert FFN through moe_jax's `ragged_dot` backend vs one dense FFN of
      equal FLOPs, bfloat16, switch-base-128 shapes (d 768, f 3072, E 128), 8k-32k tokens, balanced
      and Zipf(1.2) group sizes; TFLOP/s = 4 T d f / time.
  (b) a switch-base-128-shaped model (random HF init, --layers + --layers blocks, every second one
      sparse) in transformers and in moe_jax on the same GPU: agreement (max and mean abs diff of
      the encoder output; in bfloat16 a router near-tie can send a token to another expert on one
      side, so the max diff is only meaningful in float32) and encoder tokens/s at a few batches.
  (c) the replication machinery of one MoE layer: pregate predictor + greedy placement + prefetch
      time, as a fraction of the MoE layer's time, on the devices present (one GPU: an expert axis
      of 1, so the placement has nowhere to put replicas and the prefetch moves nothing; the
      fraction is then the fixed overhead of running them).
  (d) a decoder family (Qwen3-MoE, random weights, float32 at "highest" matmul precision): prefill
      (generate's first pass: the prompt into the KV cache, first token's logits) and KV-cached
      greedy decode (`model.generate`), expert-parallel on the devices' ('data', 'expert') mesh,
      home slots only (`DefaultMoE`) and with replicas (`replication=ReplicationConfig(
      predictor="pregate", num_replica_slots=2)`: a `StackRunner` per decoder pass, the load
      history carried from pass to pass); checks that replicas change nothing (hidden states and
      logits <= 1e-6 relative, same routing, identical generated tokens) and times both phases of
      both (decode step = (generate - prefill) / N). The backends are ExecutionConfig's "auto"
      ones (or --backend): ragged_dot + ragged all-to-all on GPU (recorded in the result as
      gmm_backend / all_to_all). One GPU: an expert axis of 1 leaves replicas nowhere to go (as
      in (c)); the CPU smoke test also runs it on 8 simulated devices, where they compute tokens.
Results: <out_dir>/gpu_check_<date>_<host>_<device>.json (default out_dir benchmarks/results).
Parts (a)-(c) live in gpu_check_parts.py, part (d) in gpu_check_decoder.py; this file runs them.
Only argparse, numpy, jax and moe_jax are needed; torch + transformers only for part (b)'s peer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from gpu_check_decoder import part_decoder  # noqa: E402
from gpu_check_parts import part_grouped_matmul, part_model, part_replication  # noqa: E402

FULL = dict(d_model=768, d_ff=3072, num_experts=128, tokens=(8192, 16384, 32768),
            model=dict(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12),
            layers=4, batches=((8, 512), (32, 512)), moe_tokens=16384, replica_slots=4,
            rounds=10,
            decoder=dict(config=dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                     moe_intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                     num_experts=64, num_experts_per_tok=8, norm_topk_prob=True,
                                     max_position_embeddings=4096),
                         batch=8, prompt=512, new_tokens=32, rounds=3))
SMOKE = dict(d_model=64, d_ff=128, num_experts=8, tokens=(256,),
             model=dict(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_heads=4),
             layers=2, batches=((2, 32),), moe_tokens=256, replica_slots=2, rounds=2,
             decoder=dict(config=dict(vocab_size=256, hidden_size=32, intermediate_size=64,
                                      moe_intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                      max_position_embeddings=256),
                          batch=2, prompt=8, new_tokens=4, rounds=2))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU-friendly, < 60 s)")
  parser.add_argument("--out_dir", default=os.path.join(HERE, "results"), help="result folder")
  parser.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
  parser.add_argument("--dtype", default=None,
                      help="bfloat16 or float32; default bfloat16 (float32 with --smoke, where "
                      "the agreement check is then tight)")
  parser.add_argument("--layers", type=int, default=None, help="blocks per stack in part (b)")
  parser.add_argument("--backend", default=None,
                      help="grouped-matmul backend for (a), (c) and (d); default ragged_dot on "
                      "GPU, the CPU default on CPU")
  args = parser.parse_args(argv)
  unknown = set(args.parts.split(",")) - set("abcd")
  if unknown:
    parser.error(f"--parts: unknown part(s) {sorted(unknown)}; use a subset of a,b,c,d")
  return args


def guarded(name, fn, log):
  """fn() -> dict, or {"error": ...} with the traceback if it raised."""
  start = time.perf_counter()
  try:
    result = fn()
  except Exception as e:  # pylint: disable=broad-except
    result = {"error": f"{type(e).__name__}: {e}"[:2000],
              "traceback": traceback.format_exc()[-4000:]}
    log(f"part {name} failed: {result['error'][:500]}")
  result["wall_s"] = time.perf_counter() - start
  return result


def save_result(result, out_dir, previous=None):
  """Writes the result file (replacing `previous`, the one an earlier part wrote); its path."""
  import peer_switch  # pylint: disable=import-outside-toplevel
  path = peer_switch.write_result("gpu_check", result, out_dir=out_dir)
  if previous is not None and previous != path and os.path.exists(previous):
    os.remove(previous)
  return path


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  shapes = dict(SMOKE if args.smoke else FULL)
  layers = args.layers or shapes["layers"]
  gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
  backend = args.backend or ("ragged_dot" if gpu else "auto")
  dtype = jnp.dtype(args.dtype or ("float32" if args.smoke else "bfloat16"))
  log = lambda s: print(s, flush=True)  # noqa: E731
  log(f"gpu_check: backend {jax.default_backend()}, devices {jax.devices()}, "
      f"{'smoke' if args.smoke else 'full'} shapes, dtype {dtype.name}, gmm backend {backend}")
  parts = set(args.parts.split(","))
  result = {"smoke": args.smoke, "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "gmm_backend": backend,
            "dtype": dtype.name}
  runs = {"a": ("grouped_matmul", lambda: part_grouped_matmul(shapes, dtype, backend, log)),
          "b": ("model", lambda: part_model(shapes, dtype.name, layers, log)),
          "c": ("replication", lambda: part_replication(shapes, dtype, backend, log)),
          "d": ("decoder", lambda: part_decoder(shapes, backend, log))}
  start = time.perf_counter()
  path = None
  for part, (key, fn) in runs.items():
    if part in parts:
      result[key] = guarded(part, fn, log)
      result["total_s"] = time.perf_counter() - start
      path = save_result(result, args.out_dir, path)   # after every part: a timeout keeps them
  log(f"wrote {path} ({result.get('total_s', 0.0):.0f} s)")
  failed = [k for k in ("grouped_matmul", "model", "replication", "decoder")
            if k in result and "error" in result[k]]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
