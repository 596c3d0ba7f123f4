"""One-shot GPU check (designed for one H200, under 8 minutes), also runnable on CPU with --smoke.

  bash benchmarks/gpu_check.sh                   # on the GPU machine (writes benchmarks/results/)
  python benchmarks/gpu_check.py --smoke --out_dir=/tmp/x    # tiny shapes on CPU, ~30 s

Three parts, each guarded so one failure still leaves the others' results:
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
Results: <out_dir>/gpu_check_<date>_<host>_<device>.json (default out_dir benchmarks/results).
Only argparse, numpy, jax and moe_jax are needed; torch + transformers only for part (b)'s peer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

FULL = dict(d_model=768, d_ff=3072, num_experts=128, tokens=(8192, 16384, 32768),
            model=dict(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12),
            layers=4, batches=((8, 512), (32, 512)), moe_tokens=16384, replica_slots=4,
            rounds=10)
SMOKE = dict(d_model=64, d_ff=128, num_experts=8, tokens=(256,),
             model=dict(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_heads=4),
             layers=2, batches=((2, 32),), moe_tokens=256, replica_slots=2, rounds=2)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU-friendly, < 60 s)")
  parser.add_argument("--out_dir", default=os.path.join(HERE, "results"), help="result folder")
  parser.add_argument("--parts", default="a,b,c", help="comma-separated subset of a,b,c")
  parser.add_argument("--dtype", default=None,
                      help="bfloat16 or float32; default bfloat16 (float32 with --smoke, where "
                      "the agreement check is then tight)")
  parser.add_argument("--layers", type=int, default=None, help="blocks per stack in part (b)")
  parser.add_argument("--backend", default=None,
                      help="grouped-matmul backend for (a) and (c); default ragged_dot on GPU, "
                      "the CPU default on CPU")
  return parser.parse_args(argv)


def timed(fn, rounds):
  """Median seconds of fn() (block_until_ready'd by the caller's fn) after one warm-up call."""
  fn()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def guarded(name, fn, log):
  """fn() -> dict, or {"error": ...} with the traceback if it raised."""
  start = time.perf_counter()
  try:
    result = fn()
  except Exception as e:  # pylint: disable=broad-except
    result = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
    log(f"part {name} failed: {result['error'][:500]}")
  result["wall_s"] = time.perf_counter() - start
  return result


# --- (a) grouped matmul ---


def zipf_sizes(num_rows, num_groups, seed=0, exponent=1.2):
  rng = np.random.default_rng(seed)
  popularity = 1.0 / np.arange(1, num_groups + 1) ** exponent
  popularity = popularity[rng.permutation(num_groups)]
  return rng.multinomial(num_rows, popularity / popularity.sum()).astype(np.int32)


def balanced_sizes(num_rows, num_groups):
  sizes = np.full(num_groups, num_rows // num_groups)
  sizes[:num_rows % num_groups] += 1
  return sizes.astype(np.int32)


def part_grouped_matmul(shapes, dtype, backend, log):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax import experts, grouped_matmul  # pylint: disable=import-outside-toplevel
  d, f, e = shapes["d_model"], shapes["d_ff"], shapes["num_experts"]
  keys = jax.random.split(jax.random.key(0), 3)
  weights = {"wi": (jax.random.normal(keys[0], (e, d, f)) * d ** -0.5).astype(dtype),
             "wo": (jax.random.normal(keys[1], (e, f, d)) * f ** -0.5).astype(dtype)}
  grouped = jax.jit(lambda x, s, w: grouped_matmul.grouped_ffn(x, s, w, activation="relu",
                                                                backend=backend))
  dense = jax.jit(lambda x, w: experts.ffn(x, w["wi"][0], w["wo"][0], None, "relu"))
  rows = []
  for tokens in shapes["tokens"]:
    x = jax.random.normal(keys[2], (tokens, d)).astype(dtype)
    flops = 4.0 * tokens * d * f
    dense_s = timed(lambda: jax.block_until_ready(dense(x, weights)), shapes["rounds"])
    for load, sizes in (("balanced", balanced_sizes(tokens, e)), ("zipf", zipf_sizes(tokens, e))):
      s = jnp.asarray(sizes)
      grouped_s = timed(lambda: jax.block_until_ready(grouped(x, s, weights)), shapes["rounds"])
      rows.append({"tokens": tokens, "experts": e, "load": load, "max_group": int(sizes.max()),
                   "grouped_ms": grouped_s * 1e3, "dense_ms": dense_s * 1e3,
                   "grouped_tflops": flops / grouped_s / 1e12,
                   "dense_tflops": flops / dense_s / 1e12, "x_dense": grouped_s / dense_s})
      log(f"(a) T={tokens} E={e} {load:8s} grouped {grouped_s * 1e3:8.2f} ms "
          f"({rows[-1]['grouped_tflops']:.1f} TFLOP/s)  dense {dense_s * 1e3:8.2f} ms "
          f"({rows[-1]['dense_tflops']:.1f} TFLOP/s)  x{rows[-1]['x_dense']:.2f}")
  return {"backend": backend, "dtype": str(jnp.dtype(dtype)), "d_model": d, "d_ff": f,
          "rows": rows}


# --- (b) the model against transformers ---


def part_model(shapes, dtype_name, layers, log):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import peer_switch  # pylint: disable=import-outside-toplevel
  from moe_jax.models.switch import stack as switch_stack  # pylint: disable=import-outside-toplevel
  result = {"layers": layers, "num_experts": shapes["num_experts"], "dtype": dtype_name,
            "rows": []}
  setup = peer_switch.Setup(shapes["num_experts"], layers)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    hf_ok = True
  except ImportError as e:
    hf_ok = False
    result["hf_error"] = f"ImportError: {e}"
  gpu = jax.default_backend() == "gpu"
  directory = tempfile.mkdtemp(prefix="gpu_check_")
  if hf_ok:
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    with torch.device(device):
      hf_model = peer_switch.build_hf_model(setup, capacity=1 << 20, widths=shapes["model"])
    hf_model = hf_model.to(torch_dtype)
    result["hf_device"] = device
    log(f"(b) built the HF model on {device} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    jax_model = peer_switch.save_and_load(hf_model, directory, dtype=jnp.dtype(dtype_name))
    log(f"(b) save_pretrained + moe_jax load: {time.perf_counter() - start:.1f} s")
  else:
    from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
    from moe_jax.models.switch import SwitchConfig  # pylint: disable=import-outside-toplevel
    config = SwitchConfig(**shapes["model"], num_layers=layers, num_decoder_layers=layers,
                          num_sparse_encoder_layers=max(layers // 2, 1),
                          num_sparse_decoder_layers=max(layers // 2, 1),
                          num_experts=shapes["num_experts"], expert_capacity=1 << 20)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype_name),
                                    switch.random_params(config))
    jax_model = switch.SwitchModel(config, params)
  encode = jax.jit(lambda p, ids, mask: switch_stack.encode(p, jax_model.config, ids, mask,
                                                            moe_fn=jax_model.moe_fn)[0])
  for batch, length in shapes["batches"]:
    ids, mask = peer_switch.random_inputs(batch, length, jax_model.config.vocab_size)
    jids, jmask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    run_jax = lambda: jax.block_until_ready(encode(jax_model.params, jids, jmask))  # noqa: E731
    row = {"batch": f"{batch}x{length}", "tokens": batch * length}
    ours = np.asarray(run_jax(), np.float32)
    row["moe_jax_s"] = timed(run_jax, shapes["rounds"])
    row["moe_jax_tok_s"] = batch * length / row["moe_jax_s"]
    if hf_ok:
      tids = torch.tensor(ids, device=result["hf_device"])
      tmask = torch.tensor(mask, device=result["hf_device"])

      def run_hf():
        with torch.inference_mode():
          out = hf_model.encoder(input_ids=tids, attention_mask=tmask).last_hidden_state
        if result["hf_device"] == "cuda":
          torch.cuda.synchronize()
        return out

      theirs = run_hf().float().cpu().numpy()
      row["encoder_max_abs_diff"] = float(np.max(np.abs(theirs - ours)))
      row["encoder_mean_abs_diff"] = float(np.mean(np.abs(theirs - ours)))
      row["encoder_max_abs"] = float(np.max(np.abs(theirs)))
      row["hf_s"] = timed(run_hf, shapes["rounds"])
      row["hf_tok_s"] = batch * length / row["hf_s"]
      row["speedup"] = row["hf_s"] / row["moe_jax_s"]
    result["rows"].append(row)
    log(f"(b) {row['batch']}: moe_jax {row['moe_jax_tok_s']:.0f} tok/s"
        + (f", HF {row['hf_tok_s']:.0f} tok/s, x{row['speedup']:.2f}, max |diff| "
           f"{row['encoder_max_abs_diff']:.2e} (of {row['encoder_max_abs']:.1f})" if hf_ok else ""))
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(directory, ignore_errors=True)
  return result


# --- (c) predictor + placement + prefetch vs the MoE layer ---


def part_replication(shapes, dtype, backend, log):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import moe_jax  # pylint: disable=import-outside-toplevel
  from moe_jax import predictor  # pylint: disable=import-outside-toplevel
  e = shapes["num_experts"]
  devices = len(jax.devices())
  expert_axis = max(dv for dv in range(1, devices + 1) if devices % dv == 0 and e % dv == 0)
  mesh = moe_jax.make_mesh(1, expert_axis)
  cfg = moe_jax.MoEConfig(num_experts=e, d_model=shapes["d_model"], d_ff=shapes["d_ff"],
                          dtype=jnp.dtype(dtype).name)
  execution = moe_jax.ExecutionConfig(gmm_backend=backend or "auto")
  num_replica_slots = shapes["replica_slots"]
  keys = jax.random.split(jax.random.key(1), 3)
  params = moe_jax.init_moe_params(keys[0], cfg)
  next_router = jax.random.normal(keys[1], (cfg.d_model, e)) * cfg.d_model ** -0.5
  tokens = shapes["moe_tokens"]
  x = jax.random.normal(keys[2], (8, tokens // 8, cfg.d_model)).astype(dtype)
  predict = jax.jit(lambda x: predictor.pregate_load(x.reshape(-1, cfg.d_model), next_router, 1))
  place = jax.jit(lambda load: moe_jax.place(load, cfg, num_replica_slots=num_replica_slots,
                                             mesh=mesh))
  columns = place(predict(x))
  # Jitted, the columns are traced: no host-side check (a device-to-host copy) in the timing.
  prefetch = jax.jit(lambda p, c: moe_jax.prefetch(p, c, cfg, mesh=mesh, execution=execution))

  def run_prefetch():
    return jax.block_until_ready(prefetch(params, columns))

  replicas = run_prefetch()
  layer = jax.jit(lambda p, x, r: moe_jax.moe_apply(p, x, cfg, execution=execution, mesh=mesh,
                                                    replicas=r)[0])
  rounds = shapes["rounds"]
  result = {"tokens": tokens, "experts": e, "expert_axis": expert_axis,
            "replica_slots": replicas.num_replica_slots, "dtype": cfg.dtype,
            "predictor_ms": timed(lambda: jax.block_until_ready(predict(x)), rounds) * 1e3,
            "placement_ms": timed(lambda: jax.block_until_ready(place(predict(x))), rounds) * 1e3,
            "prefetch_ms": timed(run_prefetch, rounds) * 1e3,
            "layer_ms": timed(lambda: jax.block_until_ready(layer(params, x, replicas)),
                              rounds) * 1e3}
  result["placement_ms"] -= result["predictor_ms"]   # it was timed on top of a prediction
  overhead = result["predictor_ms"] + max(result["placement_ms"], 0.0) + result["prefetch_ms"]
  result["overhead_ms"] = overhead
  result["fraction_of_layer"] = overhead / result["layer_ms"]
  result["replicas_placed"] = int(np.sum(np.asarray(columns) >= 0))
  log(f"(c) T={tokens} E={e} expert axis {expert_axis}: predictor {result['predictor_ms']:.2f} ms"
      f" + placement {result['placement_ms']:.2f} ms + prefetch {result['prefetch_ms']:.2f} ms = "
      f"{overhead:.2f} ms vs layer {result['layer_ms']:.2f} ms -> "
      f"{100 * result['fraction_of_layer']:.1f}% ({result['replicas_placed']} replicas placed)")
  return result


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import peer_switch  # pylint: disable=import-outside-toplevel
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
  start = time.perf_counter()
  if "a" in parts:
    result["grouped_matmul"] = guarded("a", lambda: part_grouped_matmul(shapes, dtype, backend,
                                                                         log), log)
  if "b" in parts:
    result["model"] = guarded("b", lambda: part_model(shapes, dtype.name, layers, log), log)
  if "c" in parts:
    result["replication"] = guarded("c", lambda: part_replication(shapes, dtype, backend, log),
                                    log)
  result["total_s"] = time.perf_counter() - start
  path = peer_switch.write_result("gpu_check", result, out_dir=args.out_dir)
  log(f"wrote {path} ({result['total_s']:.0f} s)")
  failed = [k for k in ("grouped_matmul", "model", "replication")
            if k in result and "error" in result[k]]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
