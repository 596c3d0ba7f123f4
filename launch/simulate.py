"""Expert-parallel step time per replication policy at 8..256 devices, from routing traces.

  python launch/simulate.py                      # record traces (if missing), simulate, plot
  python launch/simulate.py --validate=benchmarks/results/straggler_<stamp>.json[,<decode>.json]
  python launch/simulate.py --shapes= --decoder=moe_jax/assets/qwen3_moe_small \
      --resident_replicas --stickiness=0.1             # a decoder model, prefill and decode

1. Traces: for each shape, a synthetic skewed MoE stack with that shape's E and top-k (narrow
   widths: only the routing is kept) runs over `--steps` batches whose topic drifts; per step and
   layer it records the true tokens per expert and the pregate / learned predicted loads (see
   moe_jax/bench/record.py). Saved under --traces_dir and reused.
   With --decoder=<checkpoint> (any decoder-only family), the model generates from --decoder_batches
   batches of prompts (held-out pydoc text if it has a SentencePiece vocabulary, else random ids),
   and per pass and MoE layer its true and pregate (+ learned, if <checkpoint>/predictor exists)
   loads are kept (moe_jax/sim/decoder_traces.py): a prefill trace (one step per batch) and a
   decode trace (every decode step). Both are simulated with the model's E and top-k on a
   gated expert of --decoder_widths, prefill at --tokens_per_device tokens and decode at
   --decode_tokens_per_device sequences per device and step (decode is costed as weight reads
   of the slots that got rows + per-row compute: moe_jax/sim/cost.py).
2. Simulation: for each device count, every policy places replicas from its estimate with
   moe_jax.placement.place and is costed by moe_jax/sim/cost.py on each of `--clusters`, with
   each data row's loads resampled to --tokens_per_device tokens per device (sim/traces.py).
3. Validation (--validate): the straggler benchmark's measured steps (prefill or decode, from
   its --phase) re-costed on the cluster it fitted on this machine; prints the error of the
   modelled step time vs the measured median and minimum, and of the modelled speedup vs the
   measured (median paired) one.
Writes simulate_<stamp>.json, simulate_<stamp>_<cluster>.png (and validate_<stamp>.json) under
--out_dir. `--shapes=` with --validate only validates.
"""

import _setup

_setup.simulate_cpu_devices(2)      # a decoder model records its traces on a (1, 2) mesh

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

import moe_jax  # noqa: E402
from moe_jax import models, sim  # noqa: E402
from moe_jax.app import data as data_lib  # noqa: E402
from moe_jax.app import predictor_training  # noqa: E402
from moe_jax.app.config import UsageError  # noqa: E402
from moe_jax.config import MoEConfig  # noqa: E402
from moe_jax.bench import record, workload  # noqa: E402
from moe_jax.models.decoder.model import DecoderModel  # noqa: E402
from moe_jax.sim import decoder_traces, plot, traces, validate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results")
FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["switch_base_128", "switch_base_256", "gated_64x_top2"],
                  f"expert shapes from {sorted(sim.SHAPES)}")
flags.DEFINE_list("devices", ["8", "16", "32", "64", "128", "256"], "device counts")
flags.DEFINE_list("clusters", ["h100_ib", "h100_nvlink"], f"cluster presets from "
                  f"{sorted(sim.CLUSTERS)}")
flags.DEFINE_integer("tokens_per_device", 4096, "tokens each device is the source of per step")
flags.DEFINE_integer("replica_slots", 2, "replica slots per device")
flags.DEFINE_list("policies", list(sim.policies.POLICIES), "policies")
flags.DEFINE_string("traces_dir", os.path.join(RESULTS, "traces"), "recorded traces")
flags.DEFINE_bool("rerecord", False, "record the traces again even if present")
flags.DEFINE_integer("steps", 12, "trace steps (batches)")
flags.DEFINE_integer("layers", 6, "MoE layers in the recorded stack")
flags.DEFINE_integer("record_width", 64, "d_model of the recorded stack (d_ff = 2x)")
flags.DEFINE_integer("record_batch", 8, "sequences per recorded step")
flags.DEFINE_integer("record_length", 1024, "tokens per recorded sequence")
flags.DEFINE_float("skew", 0.25, "router skew of the recorded stack (moe_jax/bench/workload.py)")
flags.DEFINE_float("topic_scale", 0.1, "step-to-step topic drift of the recorded batches")
flags.DEFINE_float("mix_scale", 0.1, "scale of the recorded stack's dense sublayers")
flags.DEFINE_bool("resident_replicas", False, "replicas stay resident between steps: only "
                  "changed slots move (ReplicationConfig(resident=True)); false: every replica "
                  "is refetched every step (the library default)")
flags.DEFINE_float("stickiness", 0.0, "with --resident_replicas: a layer keeps its table unless "
                   "a new one lowers the expected max device load by more than this fraction")
flags.DEFINE_bool("assemble_weights", False, "replicating layers copy home + replica weights "
                  "into one stack every layer (older moe_jax); false: read in place (moe_jax now)")
flags.DEFINE_integer("learned_steps", 300, "learned predictor training steps")
flags.DEFINE_list("validate", [], "straggler benchmark JSONs (prefill and/or decode) to "
                  "validate the model against")
flags.DEFINE_string("decoder", "", "a decoder-only checkpoint (HF or orbax dir) whose prefill and "
                    "decode traces to record and simulate; empty: none")
flags.DEFINE_list("phases", ["prefill", "decode"], "the decoder's phases to simulate")
flags.DEFINE_integer("decoder_batches", 4, "batches of prompts the decoder generates from")
flags.DEFINE_integer("decoder_batch", 16, "prompts per batch")
flags.DEFINE_integer("decoder_prompt", 64, "tokens per prompt")
flags.DEFINE_integer("decoder_new_tokens", 32, "decode steps per batch")
flags.DEFINE_list("decoder_widths", ["2048", "768"], "d_model, d_ff of the simulated gated "
                  "bf16 expert (default: Qwen3-30B-A3B's) under the decoder's routing")
flags.DEFINE_integer("decode_tokens_per_device", 64, "decode: sequences each device decodes "
                     "per step")
flags.DEFINE_string("out_dir", RESULTS, "output directory")


def _record(shape_key: str, path: str) -> traces.Trace:
  """Records (true, pregate, learned) loads of a skewed stack with the shape's E and top-k."""
  shape = sim.SHAPES[shape_key]
  cfg = MoEConfig(num_experts=shape.num_experts, top_k=shape.top_k, d_model=FLAGS.record_width,
                  d_ff=2 * FLAGS.record_width, activation="silu" if shape.gated else "relu")
  params = workload.skewed_stack(jax.random.key(0), cfg, FLAGS.layers, skew=FLAGS.skew,
                                 permute=True, mix_scale=FLAGS.mix_scale)
  batch = lambda step: workload.topic_batch(cfg, FLAGS.record_batch, FLAGS.record_length, step,
                                            topic_scale=FLAGS.topic_scale)
  recorded = record.run_stack(params, cfg, [batch(s) for s in range(FLAGS.steps)])
  train = record.run_stack(params, cfg, [batch(1000 + s) for s in range(4)])
  learned = record.train_learned(params, train, steps=FLAGS.learned_steps, log_every=0)
  meta = dict(source="launch/simulate.py", shape=shape_key, width=FLAGS.record_width,
              skew=FLAGS.skew, topic_scale=FLAGS.topic_scale, mix_scale=FLAGS.mix_scale,
              layers=FLAGS.layers, tokens_per_step=FLAGS.record_batch * FLAGS.record_length)
  trace = record.to_trace(params, cfg, recorded, learned=learned, meta=meta)
  traces.save(path, trace)
  return trace


def _trace(shape_key: str) -> traces.Trace:
  os.makedirs(FLAGS.traces_dir, exist_ok=True)
  path = os.path.join(FLAGS.traces_dir, f"{shape_key}.npz")
  if os.path.exists(path) and not FLAGS.rerecord:
    return traces.load(path)
  logging.info("recording %s", path)
  return _record(shape_key, path)


def _decoder_batches(path: str, config) -> list:
  """[(input_ids, mask) <int32>[B, P]]: held-out pydoc windows, or random ids (no vocabulary)."""
  count, batch, length = FLAGS.decoder_batches, FLAGS.decoder_batch, FLAGS.decoder_prompt
  tokenizer = data_lib.load_tokenizer(path)
  if tokenizer is not None:
    _, held_out = data_lib.split_topics()
    stream = data_lib.token_stream(list(held_out.values()), tokenizer)
    ids = models.checkpoint_family(path).text_windows(stream, length=length)["input_ids"]
    if len(ids) < count * batch:
      raise UsageError(f"the held-out text has {len(ids)} windows of {length} tokens, fewer "
                       f"than {count} x {batch}; lower --decoder_batches or --decoder_prompt.")
  else:
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (count * batch, length))
  ids = np.asarray(ids[:count * batch], np.int32).reshape(count, batch, length)
  return [(x, np.ones_like(x)) for x in ids]


def _record_decoder(path: str, files: dict) -> dict:
  """phase -> `Trace` of the decoder at `path`, recorded with its pregate (+ learned) loads."""
  try:
    model = models.from_pretrained(path, mesh=moe_jax.make_mesh(data=1, expert=2))
  except (OSError, ValueError) as e:       # CheckpointError is a ValueError
    raise UsageError(f"--decoder={path}: {str(e).splitlines()[0]}") from None
  if not isinstance(model, DecoderModel):
    raise UsageError(f"--decoder={path} is a {type(model).__name__}; give a decoder-only "
                     f"checkpoint (one of {sorted(set(models.FAMILIES) - {'switch'})}).")
  learned_dir = os.path.join(path, "predictor")
  learned = (jax.tree.map(np.asarray, predictor_training.restore_learned(learned_dir))
             if os.path.isdir(learned_dir) else None)    # host arrays: jit places them
  kinds = ("pregate",) + (("learned",) if learned is not None else ())
  meta = dict(source="launch/simulate.py --decoder", checkpoint=path, predictors=list(kinds))
  recorded = decoder_traces.record(model, _decoder_batches(path, model.config),
                                   max_new_tokens=FLAGS.decoder_new_tokens, predictors=kinds,
                                   learned=learned, meta=meta)
  out = dict(zip(("prefill", "decode"), recorded))
  for phase, trace in out.items():
    traces.save(files[phase], trace)
  return out


def _decoder_workloads() -> list:
  """[(label, trace, shape, phase, tokens per device)] of --decoder's phases."""
  path = FLAGS.decoder.rstrip("/")
  name = os.path.basename(path)
  size = (f"b{FLAGS.decoder_batch}x{FLAGS.decoder_prompt}+{FLAGS.decoder_new_tokens}"
          f"x{FLAGS.decoder_batches}")
  files = {p: os.path.join(FLAGS.traces_dir, f"decoder_{name}_{size}_{p}.npz")
           for p in ("prefill", "decode")}
  os.makedirs(FLAGS.traces_dir, exist_ok=True)
  if FLAGS.rerecord or not all(os.path.exists(f) for f in files.values()):
    logging.info("recording %s", files)
    recorded = _record_decoder(path, files)
  else:
    recorded = {p: traces.load(f) for p, f in files.items()}
  d_model, d_ff = (int(w) for w in FLAGS.decoder_widths)
  first = recorded["prefill"]
  shape = sim.ExpertShape(f"{name} routing, d{d_model} f{d_ff} gated", d_model, d_ff,
                          first.num_experts, top_k=first.top_k, gated=True)
  tokens = {"prefill": FLAGS.tokens_per_device, "decode": FLAGS.decode_tokens_per_device}
  return [(f"{name} {p}", recorded[p], shape, p, tokens[p]) for p in FLAGS.phases]


def _workloads() -> list:
  """[(label, trace, shape, phase, tokens per device)]: --shapes (prefill), then --decoder's."""
  out = [(key, _trace(key), sim.SHAPES[key], "prefill", FLAGS.tokens_per_device)
         for key in FLAGS.shapes]
  return out + (_decoder_workloads() if FLAGS.decoder else [])


def _imbalance(trace: traces.Trace) -> float:
  """Mean over steps and layers of max / mean tokens per expert."""
  load = trace.true_load
  return float(np.mean(load.max(-1) / load.mean(-1)))


def _simulate_all(cluster, workloads) -> dict:
  """label -> device count -> policy -> `PolicyResult` on one cluster."""
  results = {}
  for label, trace, shape, phase, tokens in workloads:
    start = time.monotonic()
    policies = [p for p in FLAGS.policies if p in ("none", "history", "oracle")
                or p in trace.predicted]
    results[label] = {n: sim.simulate(trace, shape, cluster, n, policies=policies,
                                      tokens_per_device=tokens,
                                      num_replica_slots=FLAGS.replica_slots,
                                      resident_replicas=FLAGS.resident_replicas,
                                      stickiness=FLAGS.stickiness,
                                      assemble_weights=FLAGS.assemble_weights, phase=phase)
                      for n in (int(d) for d in FLAGS.devices)}
    print(f"{label}: trace {trace.num_steps} steps x {trace.num_layers} layers, expert max/mean "
          f"{_imbalance(trace):.2f} (simulation {time.monotonic() - start:.0f} s)", flush=True)
  return results


def _print_results(results: dict, cluster, workloads) -> None:
  print(f"\ncluster {cluster.name}; r={FLAGS.replica_slots}, replicas {_replica_mode()}; mean "
        "modelled step time (all MoE layers), speedup over none (ideal speedup from the busiest "
        "device's tokens)")
  for label, _, shape, phase, tokens in workloads:
    by_devices = results[label]
    counts = sorted(by_devices)
    unit = "sequences" if phase == "decode" else "tokens"
    print(f"\n{label}: {shape.name}, {phase}, {tokens} {unit}/device")
    print(f"{'policy':9s}" + "".join(f"{n:>22d}" for n in counts))
    for policy in by_devices[counts[0]]:
      cells = [by_devices[n][policy] for n in counts]
      print(f"{policy:9s}" + "".join(
          f"{c.mean_step_s * 1e3:9.3f}ms {c.speedup:4.2f}x({c.ideal_speedup:4.2f})"
          for c in cells))


def _replica_mode() -> str:
  fetch = (f"resident between steps (stickiness {FLAGS.stickiness})" if FLAGS.resident_replicas
           else "refetched every step")
  return fetch + (", home + replica weights assembled per layer" if FLAGS.assemble_weights
                  else ", weights read in place")


def _to_json(results: dict, workloads) -> dict:
  out = {}
  for label, _, shape, phase, tokens in workloads:
    out[label] = dict(shape=dataclasses.asdict(shape), phase=phase, tokens_per_device=tokens,
                      devices={str(n): {p: dict(mean_step_s=r.mean_step_s, speedup=r.speedup,
                                                ideal_speedup=r.ideal_speedup, mesh=list(r.mesh),
                                                breakdown=r.breakdown)
                                        for p, r in by_policy.items()}
                               for n, by_policy in results[label].items()})
  return out


def _validate(report_path: str) -> dict:
  """Re-costs the straggler benchmark's measured steps on the cluster it fitted."""
  with open(report_path) as f:
    report = json.load(f)
  flags_used, fitted = report["flags"], report["cluster"]
  phase = flags_used.get("phase", "prefill")
  shape = validate.straggler_shape(flags_used)
  cluster = sim.Cluster("cpu (fitted by benchmarks/straggler.py)", **fitted)
  runs = validate.load_runs(os.path.join(os.path.dirname(report_path), report["runs_file"]))
  tokens_per_device = flags_used["batch"] * flags_used["length"] / 2
  rows = validate.compare(runs, validate.simulate_runs(
      runs, shape, cluster, tokens_per_device, resident=flags_used.get("resident", False),
      phase=phase))
  print(f"\nvalidation ({phase}) against {os.path.basename(report_path)} (2 processes x 1 "
        "core); speedups over none: measured = median of paired ratios (ratio of minima)")
  print(f"{'policy':9s} {'median ms':>10s} {'min ms':>8s} {'model ms':>9s} {'err/median':>11s} "
        f"{'err/min':>8s} {'speedup':>8s} {'(min)':>7s} {'model':>7s} {'err':>7s}")
  for p, r in rows.items():
    print(f"{p:9s} {r['measured_s'] * 1e3:10.1f} {r['measured_min_s'] * 1e3:8.1f} "
          f"{r['simulated_s'] * 1e3:9.1f} {r['error'] * 100:10.1f}% "
          f"{r['error_vs_min'] * 100:7.1f}% {r['measured_paired_speedup']:8.3f} "
          f"{r['measured_min_speedup']:7.3f} {r['simulated_speedup']:7.3f} "
          f"{r['speedup_error'] * 100:6.1f}%")
  return dict(report=os.path.basename(report_path), phase=phase, cluster=fitted, policies=rows)


def main(argv):
  del argv
  if FLAGS.stickiness > 0 and not FLAGS.resident_replicas:
    raise UsageError("--stickiness keeps the previous step's table, which only resident "
                     "replicas remember: add --resident_replicas.")
  if not set(FLAGS.phases) <= set(sim.cost.PHASES):
    raise UsageError(f"--phases={','.join(FLAGS.phases)}: use some of {','.join(sim.cost.PHASES)}.")
  if len(FLAGS.decoder_widths) != 2:
    raise UsageError("--decoder_widths takes two numbers, d_model,d_ff (e.g. 2048,768).")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  if FLAGS.validate:
    rows = [_validate(path) for path in FLAGS.validate]
    with open(os.path.join(FLAGS.out_dir, f"validate_{stamp}.json"), "w") as f:
      json.dump(rows if len(rows) > 1 else rows[0], f, indent=1)
  if not FLAGS.shapes and not FLAGS.decoder:
    return
  base = os.path.join(FLAGS.out_dir, f"simulate_{stamp}")
  report = dict(flags={k: FLAGS[k].value for k in (
      "tokens_per_device", "replica_slots", "steps", "layers", "skew", "topic_scale", "mix_scale",
      "resident_replicas", "stickiness", "assemble_weights", "shapes", "devices", "decoder",
      "phases", "decoder_batches", "decoder_batch", "decoder_prompt", "decoder_new_tokens",
      "decoder_widths", "decode_tokens_per_device")}, clusters={})
  workloads = _workloads()
  for name in FLAGS.clusters:
    cluster = sim.CLUSTERS[name]
    results = _simulate_all(cluster, workloads)
    _print_results(results, cluster, workloads)
    report["clusters"][name] = dict(cluster=dataclasses.asdict(cluster),
                                    results=_to_json(results, workloads))
    plot.step_time_vs_devices(results, f"{base}_{name}.png", title=(
        f"{cluster.name}: r={FLAGS.replica_slots}, replicas {_replica_mode()}"))
  with open(base + ".json", "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {base}.json and {base}_<cluster>.png")


if __name__ == "__main__":
  _setup.run(main, multi_process=False)
