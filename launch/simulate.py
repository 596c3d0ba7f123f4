"""Expert-parallel step time per replication policy at 8..256 devices, from routing traces.

  python launch/simulate.py                      # record traces (if missing), simulate, plot
  python launch/simulate.py --validate=benchmarks/results/straggler_<stamp>.json

1. Traces: for each shape, a synthetic skewed MoE stack with that shape's E and top-k (narrow
   widths: only the routing is kept) runs over `--steps` batches whose topic drifts; per step and
   layer it records the true tokens per expert and the pregate / learned predicted loads (see
   moe_jax/bench/record.py). Saved under --traces_dir and reused.
2. Simulation: for each device count, every policy places replicas from its estimate with
   moe_jax.placement.place and is costed by moe_jax/sim/cost.py on each of `--clusters`, with
   each data row's loads resampled to --tokens_per_device tokens per device (sim/traces.py).
3. Validation (--validate): the straggler benchmark's measured steps re-costed on the cluster it
   fitted on this machine; prints the error of the modelled vs the measured median and minimum.
Writes simulate_<stamp>.json, simulate_<stamp>_<cluster>.png (and validate_<stamp>.json) under
--out_dir. `--shapes=` with --validate only validates.
"""

import _setup

_setup.simulate_cpu_devices(1)

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from moe_jax import sim  # noqa: E402
from moe_jax.app.config import UsageError  # noqa: E402
from moe_jax.config import MoEConfig  # noqa: E402
from moe_jax.bench import record, workload  # noqa: E402
from moe_jax.sim import plot, traces, validate  # noqa: E402

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
flags.DEFINE_string("validate", None, "a straggler benchmark JSON to validate the model against")
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


def _imbalance(trace: traces.Trace) -> float:
  """Mean over steps and layers of max / mean tokens per expert."""
  load = trace.true_load
  return float(np.mean(load.max(-1) / load.mean(-1)))


def _simulate_all(cluster) -> dict:
  """shape -> device count -> policy -> `PolicyResult` on one cluster."""
  results = {}
  for key in FLAGS.shapes:
    start = time.monotonic()
    trace, shape = _trace(key), sim.SHAPES[key]
    loaded = time.monotonic()
    results[key] = {n: sim.simulate(trace, shape, cluster, n, policies=FLAGS.policies,
                                    tokens_per_device=FLAGS.tokens_per_device,
                                    num_replica_slots=FLAGS.replica_slots,
                                    resident_replicas=FLAGS.resident_replicas,
                                    stickiness=FLAGS.stickiness,
                                    assemble_weights=FLAGS.assemble_weights)
                    for n in (int(d) for d in FLAGS.devices)}
    print(f"{key}: trace {trace.num_steps} steps x {trace.num_layers} layers, expert max/mean "
          f"{_imbalance(trace):.2f} (trace {loaded - start:.0f} s, simulation "
          f"{time.monotonic() - loaded:.0f} s)", flush=True)
  return results


def _print_results(results: dict, cluster) -> None:
  print(f"\ncluster {cluster.name}; {FLAGS.tokens_per_device} tokens/device, r="
        f"{FLAGS.replica_slots}, replicas {_replica_mode()}; mean modelled step time (all MoE "
        "layers), speedup over none (ideal speedup from the busiest device's tokens)")
  for key, by_devices in results.items():
    counts = sorted(by_devices)
    print(f"\n{sim.SHAPES[key].name}")
    print(f"{'policy':9s}" + "".join(f"{n:>22d}" for n in counts))
    for policy in FLAGS.policies:
      cells = [by_devices[n][policy] for n in counts]
      print(f"{policy:9s}" + "".join(
          f"{c.mean_step_s * 1e3:9.2f}ms {c.speedup:4.2f}x({c.ideal_speedup:4.2f})" for c in cells))


def _replica_mode() -> str:
  fetch = (f"resident between steps (stickiness {FLAGS.stickiness})" if FLAGS.resident_replicas
           else "refetched every step")
  return fetch + (", home + replica weights assembled per layer" if FLAGS.assemble_weights
                  else ", weights read in place")


def _to_json(results: dict) -> dict:
  out = {}
  for key, by_devices in results.items():
    out[key] = {str(n): {p: dict(mean_step_s=r.mean_step_s, speedup=r.speedup,
                                 ideal_speedup=r.ideal_speedup, mesh=list(r.mesh),
                                 breakdown=r.breakdown)
                         for p, r in by_policy.items()}
                for n, by_policy in by_devices.items()}
  return out


def _validate(report_path: str) -> dict:
  """Re-costs the straggler benchmark's measured steps on the cluster it fitted."""
  with open(report_path) as f:
    report = json.load(f)
  flags_used, fitted = report["flags"], report["cluster"]
  shape = sim.ExpertShape(
      "straggler", flags_used["d_model"], flags_used["d_ff"], flags_used["num_experts"], top_k=1,
      param_bytes=4, act_bytes=4,
      dense_flops_per_token=2.0 * flags_used["d_model"] * (flags_used["d_model"]
                                                           + flags_used["num_experts"]))
  cluster = sim.Cluster("cpu (fitted by benchmarks/straggler.py)", **fitted)
  runs = validate.load_runs(os.path.join(os.path.dirname(report_path), report["runs_file"]))
  tokens_per_device = flags_used["batch"] * flags_used["length"] / 2
  rows = validate.compare(runs, validate.simulate_runs(
      runs, shape, cluster, tokens_per_device, resident=flags_used.get("resident", False)))
  print(f"\nvalidation against {os.path.basename(report_path)} (2 processes x 1 core):")
  print(f"{'policy':9s} {'median ms':>10s} {'min ms':>8s} {'model ms':>9s} {'err/median':>11s} "
        f"{'err/min':>8s} {'speedup med.':>13s} {'speedup min':>12s} {'speedup model':>14s}")
  for p, r in rows.items():
    print(f"{p:9s} {r['measured_s'] * 1e3:10.1f} {r['measured_min_s'] * 1e3:8.1f} "
          f"{r['simulated_s'] * 1e3:9.1f} {r['error'] * 100:10.1f}% "
          f"{r['error_vs_min'] * 100:7.1f}% "
          f"{r['measured_speedup']:13.3f} {r['measured_min_speedup']:12.3f} "
          f"{r['simulated_speedup']:14.3f}")
  return dict(report=os.path.basename(report_path), cluster=fitted, policies=rows)


def main(argv):
  del argv
  if FLAGS.stickiness > 0 and not FLAGS.resident_replicas:
    raise UsageError("--stickiness keeps the previous step's table, which only resident "
                     "replicas remember: add --resident_replicas.")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  if FLAGS.validate:
    rows = _validate(FLAGS.validate)
    with open(os.path.join(FLAGS.out_dir, f"validate_{stamp}.json"), "w") as f:
      json.dump(rows, f, indent=1)
  if not FLAGS.shapes:
    return
  base = os.path.join(FLAGS.out_dir, f"simulate_{stamp}")
  report = dict(flags={k: FLAGS[k].value for k in (
      "tokens_per_device", "replica_slots", "steps", "layers", "skew", "topic_scale", "mix_scale",
      "resident_replicas", "stickiness", "assemble_weights", "shapes", "devices")}, clusters={})
  for name in FLAGS.clusters:
    cluster = sim.CLUSTERS[name]
    results = _simulate_all(cluster)
    _print_results(results, cluster)
    report["clusters"][name] = dict(cluster=dataclasses.asdict(cluster),
                                    results=_to_json(results))
    plot.step_time_vs_devices(results, f"{base}_{name}.png", title=(
        f"{cluster.name}: {FLAGS.tokens_per_device} tokens/device, r={FLAGS.replica_slots}, "
        f"replicas {_replica_mode()}"))
  with open(base + ".json", "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {base}.json and {base}_<cluster>.png")


if __name__ == "__main__":
  _setup.run(main, multi_process=False)
