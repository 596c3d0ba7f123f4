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
    result = {"error": f"{type(e).__name__}: {e}"[:2000],
              "traceback": traceback.format_exc()[-4000:]}
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


# --- (d) a decoder family: prefill + KV-cached decode, with and without replicas ---


def expert_mesh(num_experts):
  """A (1, De) mesh: De the largest device count that divides both the devices and E."""
  import jax  # pylint: disable=import-outside-toplevel
  import moe_jax  # pylint: disable=import-outside-toplevel
  devices = len(jax.devices())
  expert_axis = max(dv for dv in range(1, devices + 1)
                    if devices % dv == 0 and num_experts % dv == 0)
  return moe_jax.make_mesh(1, expert_axis)


def placed_params(family, config, mesh, seed=0):
  """The family's random params on `mesh`: expert stacks sharded over 'expert', the rest
  replicated (as `from_pretrained(..., mesh=mesh)` places them)."""
  from moe_jax.checkpoints import hf_io, layout  # pylint: disable=import-outside-toplevel
  key_map = family.hf_key_map(config)
  place = hf_io.device_placer(mesh, "expert", key_map.expert_paths())
  flat = layout.flatten(family.random_params(config, seed=seed))
  return layout.build_tree({path: place(path, leaf) for path, leaf in flat.items()})


REPLICATION = dict(predictor="pregate", num_replica_slots=2)


def decoder_programs(model, max_new_tokens):
  """(prefill, generate), each taking `replicate`: False runs home slots only (the model's
  `DefaultMoE`), True replicas placed one MoE layer ahead (`replication.Replicator`: a fresh
  `StackRunner` per decoder pass, the load history carried from pass to pass).

  generate is the model's own (`model.generate(..., replication=...)`, no eos: every row decodes
  all steps) and returns (tokens <int32>[B, P + N], rows computed in replica slots over all
  passes). prefill is its first pass, jitted alone (the prompt into a cache of P + N slots, then
  the first token's logits); it returns (hidden <f>[B, P, d], first-token logits <f32>[B, V],
  routing <int32>[MoE layers, B, P, k], rows computed in replica slots, replica slots filled,
  the cache).
  """
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax import replication  # pylint: disable=import-outside-toplevel
  from moe_jax.models.decoder import generate as decoder_generate  # pylint: disable=C0415
  from moe_jax.models.decoder import stack  # pylint: disable=import-outside-toplevel
  cfg = model.config
  rcfg = replication.ReplicationConfig(**REPLICATION)
  replicator = replication.Replicator(rcfg, model.moe_config, model.mesh, model.execution)
  home = cfg.num_experts // model.mesh.shape["expert"]

  def filled(runner):
    tables = [r.slot_table for records in runner.records().values() for r in records]
    return sum(jnp.sum(t[:, home:] >= 0) for t in tables).astype(jnp.int32)

  @functools.partial(jax.jit, static_argnames="replicate")
  def prefill(params, ids, mask, replicate):
    batch, prompt = ids.shape
    full_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = decoder_generate.generation_positions(full_mask)[:, :prompt]
    cache = stack.init_cache(cfg, batch, prompt + max_new_tokens, params["embed"].dtype)
    runner = None
    if replicate:
      layers = stack.moe_layers(params, cfg)
      runner = replicator.runner(layers, replicator.init_state(layers))
    hidden, cache, records = stack.decode(params, cfg, ids, positions, full_mask, cache,
                                          moe_fn=model.moe_fn if runner is None else runner.moe_fn)
    first = stack.lm_logits(params, cfg, hidden[:, -1:])[:, 0]
    routing = jnp.stack([r.expert_index for r in records])
    zero = jnp.zeros((), jnp.int32)
    counts = (zero, zero) if runner is None else (runner.replica_rows(), filled(runner))
    return (hidden, first, routing) + counts + (cache,)

  def generate(params, ids, mask, replicate):
    del params   # the model's own
    if not replicate:
      return model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=None), 0
    tokens, stats = model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=None,
                                   replication=rcfg, return_stats=True)
    return tokens, stats.replica_rows

  return prefill, generate


def rel_diff(a, b):
  """max |a - b| / max |b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def time_decoder(programs, params, ids, mask, replicate, rounds, new_tokens):
  """Prefill and per-step decode times of one variant (decode: (generate - prefill) /
  new_tokens; every row decodes all steps: no eos)."""
  import jax  # pylint: disable=import-outside-toplevel
  prefill, generate = programs
  prefill_s = timed(lambda: jax.block_until_ready(prefill(params, ids, mask, replicate)), rounds)
  generate_s = timed(lambda: jax.block_until_ready(generate(params, ids, mask, replicate)),
                     rounds)
  batch, prompt = ids.shape
  decode_s = max(generate_s - prefill_s, 0.0) / new_tokens
  return {"prefill_ms": prefill_s * 1e3,
          "prefill_tok_s": batch * prompt / prefill_s, "generate_ms": generate_s * 1e3,
          "decode_step_ms": decode_s * 1e3,
          "decode_tok_s": batch / decode_s if decode_s > 0 else None}


def check_replicas(programs, params, ids, mask):
  """Replicated vs home-only prefill and generate of the same inputs (also compiles them)."""
  prefill, generate = programs
  start = time.perf_counter()
  plain = prefill(params, ids, mask, False)
  hidden, first, routing, replica_rows, filled, _ = prefill(params, ids, mask, True)
  plain_tokens = np.asarray(generate(params, ids, mask, False)[0])
  tokens, generate_rows = generate(params, ids, mask, True)
  tokens = np.asarray(tokens)
  out = {"hidden_rel_diff": rel_diff(hidden, plain[0]),
         "logits_rel_diff": rel_diff(first, plain[1]),
         "routing_mismatches": int(np.sum(np.asarray(routing) != np.asarray(plain[2]))),
         "replica_rows": int(replica_rows), "replicas_placed": int(filled),
         "generate_replica_rows": int(generate_rows),
         "tokens_identical": bool(np.array_equal(tokens, plain_tokens)),
         "tokens_mismatched": int(np.sum(tokens != plain_tokens)),
         "compile_and_check_s": time.perf_counter() - start}
  out["ok"] = (max(out["hidden_rel_diff"], out["logits_rel_diff"]) <= 1e-6
               and out["tokens_identical"])
  return out


def log_decoder(result, log):
  log(f"(d) replicas vs home only: prefill hidden states rel diff "
      f"{result['hidden_rel_diff']:.1e}, first-token logits {result['logits_rel_diff']:.1e}, "
      f"routing mismatches {result['routing_mismatches']}, generated tokens "
      f"{'identical' if result['tokens_identical'] else 'DIFFER'}; {result['replicas_placed']} "
      f"replica slots filled in the prefill, {result['replica_rows']} rows computed in them "
      f"({result['generate_replica_rows']} over all of generate's passes; compile + check "
      f"{result['compile_and_check_s']:.1f} s)")
  for name in ("home_only", "replicas"):
    r = result[name]
    log(f"(d) {name:9s} B={result['batch']} P={result['prompt']}: prefill "
        f"{r['prefill_ms']:.1f} ms ({r['prefill_tok_s']:.0f} tok/s), decode "
        f"{r['decode_step_ms']:.2f} ms/step over {result['new_tokens']} steps")


def part_decoder(shapes, backend, log):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import moe_jax  # pylint: disable=import-outside-toplevel
  from moe_jax import grouped_matmul, models, replicas  # pylint: disable=import-outside-toplevel
  spec = shapes["decoder"]
  family = models.get_family("qwen3_moe")
  config = family.Config(**spec["config"])
  mesh = expert_mesh(config.num_experts)
  execution = moe_jax.ExecutionConfig(gmm_backend=backend or "auto")
  start = time.perf_counter()
  model = family.Model(config, placed_params(family, config, mesh), mesh=mesh,
                       execution=execution)
  log(f"(d) built a random {family.NAME} model on mesh {dict(mesh.shape)} in "
      f"{time.perf_counter() - start:.1f} s")
  batch, prompt, new = spec["batch"], spec["prompt"], spec["new_tokens"]
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt)),
                    jnp.int32)
  mask = jnp.ones((batch, prompt), jnp.int32)
  result = {"family": family.NAME, "config": spec["config"], "mesh": dict(mesh.shape),
            "batch": batch, "prompt": prompt, "new_tokens": new, "dtype": "float32",
            "matmul_precision": "highest", "replication": REPLICATION,
            "gmm_backend": (grouped_matmul.default_backend() if execution.gmm_backend == "auto"
                            else execution.gmm_backend),
            "all_to_all": replicas.exchange_mode(execution)}
  programs = decoder_programs(model, new)
  with jax.default_matmul_precision("highest"):
    result.update(check_replicas(programs, model.params, ids, mask))
    for name, replicate in (("home_only", False), ("replicas", True)):
      result[name] = time_decoder(programs, model.params, ids, mask, replicate, spec["rounds"],
                                  new)
  log_decoder(result, log)
  if not result["ok"]:
    raise AssertionError(f"replicas changed the decoder's outputs: {result}")
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
