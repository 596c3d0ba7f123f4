"""Real straggler benchmark: 2 processes x 1 pinned CPU core, the expert axis across them.

  python benchmarks/straggler.py [--num_layers=4 --batch=8 --length=512 --rounds=5]
  python benchmarks/straggler.py --phase=decode --batch=16 --steps=16     # decode steps

Starts itself twice through launch/local_cluster.py (1 CPU device per process, each process pinned
to its own core), builds a mesh data=1 x expert=2 spanning the processes and a stack of skewed MoE
layers, and times one forward step per predictor (none / history / pregate / learned / oracle) on
the same batches, interleaved over several rounds; medians are reported next to the ideal speedup
implied by the measured per-device loads (max device load under none / under the policy), and
next to an Amdahl ideal that shrinks only the straggler's expert-FFN time (see
`straggler_report.summarise`).
Replicas are resident by default (`--resident`, `--stickiness`): fetched only when a slot's
expert changes. `--phase=decode` times decode steps instead: each step is one new token for each
of `--batch` sequences ([batch, 1, d]; `--length` then sizes only the learned predictor's
training batches), the replica state carried from step to step, and the fitted cluster adds the
decode cost model's weight-read bytes/s and per-row FLOP/s (`moe_jax.sim.fit.decode_fit`). After
each batch's policies, a step of the same stack with empty experts (d_ff = 1, no replicas) is
timed: per MoE layer, less what the simulator charges such a layer, it is the cluster's fixed
`layer_overhead_s`. The
learned predictor is trained first on traces of other batches of the same stack; oracle uses the
true loads of the same batch from an untimed pass. Process 0 prints the table and writes JSON (and
the routing trace + fitted cluster for `launch/simulate.py --validate`) under benchmarks/results/.

This is a benchmark, not a test: the machine is shared, so timings are noisy; read the medians and
the spread, and rerun when in doubt.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout
import _setup  # noqa: E402,F401  (launch-script convention: before anything imports jax)

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import moe_jax  # noqa: E402
from moe_jax import distributed, host_memory, replicas, replication  # noqa: E402
from moe_jax.bench import record, workload  # noqa: E402
from moe_jax.models import moe_stack  # noqa: E402
from moe_jax import sim  # noqa: E402
from moe_jax.sim import cost, fit, traces, validate  # noqa: E402
from straggler_report import print_table, summarise  # noqa: E402  (this directory is on sys.path)

# Each process drives one device on one pinned core: one malloc arena keeps every thread's
# buffers in the reused main heap (see moe_jax/host_memory.py; before any computation).
host_memory.reuse_freed_memory()

FLAGS = flags.FLAGS
distributed.define_flags()
flags.DEFINE_integer("d_model", 512, "model width")
flags.DEFINE_integer("d_ff", 2048, "expert hidden width")
flags.DEFINE_integer("num_experts", 8, "experts per layer")
flags.DEFINE_integer("num_layers", 4, "MoE layers in the stack")
flags.DEFINE_integer("replica_slots", 2, "replica slots per device")
flags.DEFINE_integer("batch", 8, "sequences per step (split over the 2 processes)")
flags.DEFINE_integer("length", 512, "tokens per sequence (decode: of the predictor's training "
                     "batches; a decode step feeds one token per sequence)")
flags.DEFINE_enum("phase", "prefill", ["prefill", "decode"], "what a timed step is: a forward "
                  "over [batch, length] tokens, or a decode step over [batch, 1]")
flags.DEFINE_float("skew", 0.5, "router skew towards low expert ids (see moe_jax.bench.workload)")
flags.DEFINE_float("topic_scale", 0.5, "step-to-step drift of the batches' topic")
flags.DEFINE_integer("steps", 4, "distinct batches per round")
flags.DEFINE_integer("rounds", 5, "timed rounds (after one untimed warm-up round)")
flags.DEFINE_integer("train_batches", 4, "batches of traces for the learned predictor")
flags.DEFINE_integer("train_steps", 300, "learned predictor training steps")
flags.DEFINE_bool("resident", True, "keep replicas between steps; fetch only changed slots")
flags.DEFINE_float("stickiness", 0.1, "with --resident: keep a layer's table unless a new one "
                   "lowers the expected max device load by more than this fraction")
flags.DEFINE_bool("dynamic", False, "time every policy with the one dynamic program (computes "
                  "every estimator each layer) instead of one static program per policy")
flags.DEFINE_list("policies", ["none", "history", "pregate", "learned", "oracle"], "policies")
flags.DEFINE_bool("pin", True, "pin each process to its own core")
flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "where process 0 writes the JSON and the trace")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch() -> int:
  """Re-runs this script (same flags) as 2 processes x 1 CPU device via launch/local_cluster.py."""
  command = [sys.executable, os.path.join(ROOT, "launch", "local_cluster.py"), "--num_processes=2",
             "--devices_per_process=1", "--platform=cpu", "--", sys.executable,
             os.path.abspath(__file__)] + sys.argv[1:]
  return subprocess.call(command)


def _pin(process_id: int) -> list:
  """Pins this process to core `process_id` (mod the cores it may use); must precede jax's CPU
  client, which sizes its thread pool from the affinity mask."""
  cores = sorted(os.sched_getaffinity(0))
  core = cores[process_id % len(cores)]
  os.sched_setaffinity(0, {core})
  return [core]


def _build(cfg, mesh, host_params):
  """Global params (experts sharded over 'expert'), the same with empty experts (d_ff = 1: the
  fixed cost of a step), the timed batches and the training batches."""
  experts = set(replicas.EXPERT_WEIGHT_NAMES)
  put = lambda path, leaf: distributed.from_host(
      leaf, mesh, P("expert") if path[-1].key in experts else P())
  params = jax.tree_util.tree_map_with_path(put, host_params)
  empty_params = jax.tree_util.tree_map_with_path(
      put, jax.tree_util.tree_map_with_path(_empty_experts, host_params))
  rows = distributed.local_batch_rows(FLAGS.batch, mesh, ("data", "expert"))

  def batch(step, length):
    x = workload.topic_batch(cfg, FLAGS.batch, length, step, topic_scale=FLAGS.topic_scale)
    return distributed.from_process_local(x[rows], mesh, P(("data", "expert")), x.shape)

  timed = [batch(s, _length()) for s in range(FLAGS.steps)]
  train = [batch(1000 + s, FLAGS.length) for s in range(FLAGS.train_batches)]
  return params, empty_params, timed, train


def _empty_experts(path, leaf):
  """wi [E, d, f] -> zeros [E, d, 1], wo [E, f, d] -> zeros [E, 1, d]; other leaves unchanged."""
  if path[-1].key == "wi":
    return np.zeros(leaf.shape[:-1] + (1,), leaf.dtype)
  if path[-1].key == "wo":
    return np.zeros((leaf.shape[0], 1) + leaf.shape[2:], leaf.dtype)
  return leaf


def _programs(cfg, mesh):
  """(record pass (plain pass + layer inputs/probs), policy -> its timed program).

  One static program per policy, as a server would run one predictor (`--dynamic` times the
  single dynamic program instead, which computes every estimator each layer); "empty" is `none`
  on the empty-expert params.
  """
  @jax.jit
  def record_pass(params, h):
    inputs, probs = record.layer_traces(params, cfg, h, mesh=mesh)
    return inputs, probs, record.true_loads(probs, cfg.top_k)

  def timed(rcfg, cfg=cfg):
    # The state is donated: resident replicas pass through to the next state in place (without
    # donation XLA copies every held replica slot's weights into the output each step).
    @functools.partial(jax.jit, donate_argnums=(2,))
    def run(params, h, state, learned, oracle, policy):
      kwargs = {}
      if rcfg.predictor in ("learned", "dynamic"):
        kwargs["learned"] = {moe_stack.STACK: learned}
      if rcfg.predictor in ("oracle", "dynamic"):
        kwargs["oracle_loads"] = {moe_stack.STACK: oracle}
      if rcfg.predictor == "dynamic":
        kwargs["policy"] = policy
      runner = replication.StackRunner(rcfg, cfg, mesh, moe_stack.moe_layers(params), state,
                                       **kwargs)
      out, _ = moe_stack.forward(params, h, runner.moe_fn)
      records = runner.records()[moe_stack.STACK]
      summary = {"tokens_per_device": jnp.stack([r.stats.tokens_per_device for r in records]),
                 "tokens_per_expert": jnp.stack([r.stats.tokens_per_expert for r in records]),
                 "tokens_per_slot": jnp.stack([r.stats.tokens_per_slot for r in records]),
                 "predicted_load": jnp.stack([r.predicted_load for r in records]),
                 "slot_table": jnp.stack([r.slot_table for r in records]),
                 "fetched_bytes": jnp.stack([r.fetched_bytes for r in records])}
      return out, summary, runner.next_state()
    return run

  replicating = lambda kind: replication.ReplicationConfig(
      predictor=kind, num_replica_slots=FLAGS.replica_slots, resident=FLAGS.resident,
      stickiness=FLAGS.stickiness if FLAGS.resident else 0.0)
  none = replication.ReplicationConfig(predictor="none")
  programs = {"none": timed(none), "empty": timed(none, dataclasses.replace(cfg, d_ff=1))}
  if FLAGS.dynamic:
    dynamic = timed(replicating("dynamic"))
    programs.update({p: dynamic for p in FLAGS.policies if p != "none"})
  else:
    programs.update({p: timed(replicating(p)) for p in FLAGS.policies if p != "none"})
  return record_pass, programs


def _learned(record_pass, params, train, host_params):
  """Learned predictors trained (on process 0, then broadcast) on traces of `train` batches."""
  recorded = []
  for h in train:
    inputs, probs, _ = distributed.gather(record_pass(params, h))
    recorded.append({"inputs": inputs, "probs": probs})
  d, e = FLAGS.d_model, FLAGS.num_experts
  learned = [{"b": np.zeros((e,), np.float32), "w": np.zeros((d, e), np.float32)}
             for _ in range(FLAGS.num_layers - 1)]   # the shapes every process contributes
  if jax.process_index() == 0:
    learned = jax.tree.map(np.asarray, record.train_learned(
        host_params, recorded, steps=FLAGS.train_steps, log_every=0))
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(learned))


def _run_once(programs, policy, params, h, state, learned, oracle):
  """Times one step; returns (seconds, summary on device, next state)."""
  run = programs[1][policy]
  index = jnp.int32(replication.policy_index(policy) if policy in replication.DYNAMIC_KINDS
                    else 0)
  distributed.barrier(f"step-{policy}")
  start = time.perf_counter()
  out, summary, state = run(params, h, state, learned, oracle, index)
  jax.block_until_ready(out)
  return time.perf_counter() - start, summary, state


def _initial_state(params, cfg, mesh):
  state = replication.init_state({moe_stack.STACK: FLAGS.num_layers}, cfg.num_experts)
  if FLAGS.resident:
    state = replication.with_resident_replicas(state, moe_stack.moe_layers(params), cfg,
                                               FLAGS.replica_slots, mesh)
  return state


def _time_policies(programs, params, empty_params, timed, oracle, learned, cfg, mesh):
  """Warm-up round + FLAGS.rounds timed rounds; within a step, policies in rotating order, then
  the empty-expert step.

  Returns (runs: policy -> list of per-step records, fits: one `_fit_cluster` per timed round,
  so the machine is measured under the same background load as the steps).
  """
  states = {p: _initial_state(params, cfg, mesh) for p in FLAGS.policies + ["empty"]}
  runs = {p: [] for p in FLAGS.policies}
  fits = []
  for round_index in range(FLAGS.rounds + 1):
    empty_seconds = []
    for step, h in enumerate(timed):
      shift = (round_index * len(timed) + step) % len(FLAGS.policies)
      for policy in FLAGS.policies[shift:] + FLAGS.policies[:shift]:
        seconds, summary, states[policy] = _run_once(programs, policy, params, h, states[policy],
                                                     learned, oracle[step])
        if round_index > 0:
          runs[policy].append(dict(round=round_index, step=step, seconds=seconds,
                                   **distributed.gather(summary)))
      seconds, _, states["empty"] = _run_once(programs, "empty", empty_params, h,
                                              states["empty"], learned, oracle[step])
      empty_seconds.append(seconds)
    if round_index > 0:
      fits.append(_fit_cluster(mesh, cfg, float(np.median(empty_seconds))))
    logging.info("round %d done", round_index)
  return runs, fits


def _layer_overhead(empty_step_s: float, fitted: dict) -> float:
  """`Cluster.layer_overhead_s`: the empty-expert step per MoE layer minus what moe_jax.sim
  charges such a layer (dense + dispatch + combine; its gemm is ~0), at least 0."""
  shape = validate.straggler_shape(dict(_flag_dict(), d_ff=1))
  tokens = FLAGS.batch * _length() / 2
  loads = np.full((1, FLAGS.num_experts), 2 * tokens / FLAGS.num_experts)
  table = np.arange(FLAGS.num_experts).reshape(2, -1)
  modelled = cost.layer_cost(loads, table, tokens, shape, sim.Cluster("fit", **fitted),
                             replicating=False, phase=FLAGS.phase).time_s
  return max(empty_step_s / FLAGS.num_layers - modelled, 0.0)


def _fit_cluster(mesh, cfg, empty_step_s):
  """This machine as a `moe_jax.sim.Cluster` (fields as a dict), measured on every process."""
  tokens = FLAGS.batch * FLAGS.length // mesh.size
  flops = fit.expert_flops_per_s(tokens, cfg.d_model, cfg.d_ff, repeats=3)
  memory = fit.memory_bytes_per_s(repeats=3)
  bandwidth, latency = fit.all_to_all_fit(mesh, repeats=3)
  fitted = dict(flops_per_s=flops, hbm_bytes_per_s=memory, a2a_bytes_per_s=bandwidth,
                latency_s=latency, padded_all_to_all=True, overlap_prefetch=False)
  if FLAGS.phase == "decode":
    fitted["decode_bytes_per_s"], fitted["decode_flops_per_s"] = fit.decode_fit(
        cfg.d_model, cfg.d_ff, activation=cfg.activation, repeats=3)
  fitted["layer_overhead_s"] = _layer_overhead(empty_step_s, fitted)
  return fitted


def _median_fit(fits):
  return {k: (float(np.median([f[k] for f in fits])) if isinstance(fits[0][k], float)
              else fits[0][k]) for k in fits[0]}


def _write(rows, runs, cluster, cores, oracle_true, fits):
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  base = os.path.join(FLAGS.out_dir, f"straggler_{stamp}")
  arrays = {}
  for p, rs in runs.items():
    arrays[f"{p}/seconds"] = np.array([r["seconds"] for r in rs])
    arrays[f"{p}/step"] = np.array([r["step"] for r in rs])
    for key in ("predicted_load", "tokens_per_expert", "tokens_per_device", "tokens_per_slot",
                "slot_table", "fetched_bytes"):
      arrays[f"{p}/{key}"] = np.stack([r[key] for r in rs])
  np.savez_compressed(base + "_runs.npz", **arrays)
  predicted = {}
  for kind in ("pregate", "learned"):
    if kind in runs:
      first = {r["step"]: r["predicted_load"] for r in runs[kind] if r["round"] == 1}
      predicted[kind] = np.stack([first[s] for s in sorted(first)])
  traces.save(base + "_trace.npz", traces.Trace(
      true_load=np.stack(oracle_true), predicted=predicted,
      tokens_per_step=FLAGS.batch * _length(), top_k=1,
      meta={"source": "benchmarks/straggler.py", "flags": _flag_dict()}))
  report = dict(flags=_flag_dict(), cores=cores, cluster=cluster, cluster_fits=fits, policies=rows,
                runs_file=os.path.basename(base + "_runs.npz"),
                trace_file=os.path.basename(base + "_trace.npz"),
                devices=[str(d) for d in jax.devices()])
  with open(base + ".json", "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {base}.json (+ _runs.npz, _trace.npz)")


def _length() -> int:
  """Tokens per sequence in a timed step: 1 in decode."""
  return 1 if FLAGS.phase == "decode" else FLAGS.length


def _flag_dict():
  """The run's flags; `length` is the timed steps' (1 in decode: `train_length` is --length)."""
  names = ("d_model", "d_ff", "num_experts", "num_layers", "replica_slots", "batch", "skew",
           "topic_scale", "steps", "rounds", "train_batches", "train_steps", "policies",
           "resident", "stickiness", "dynamic", "phase")
  out = {n: getattr(FLAGS, n) for n in names}
  out["length"] = _length()
  if FLAGS.phase == "decode":
    out["train_length"] = FLAGS.length
  return out


def main(argv):
  del argv
  if "none" not in FLAGS.policies:
    raise app.UsageError("--policies must include none: every speedup is relative to it.")
  if FLAGS.process_id is None and FLAGS.coordinator is None:
    sys.exit(_launch())
  cores = _pin(FLAGS.process_id) if FLAGS.pin else sorted(os.sched_getaffinity(0))
  info = distributed.initialize_from_flags()
  cfg = moe_jax.MoEConfig(num_experts=FLAGS.num_experts, top_k=1, d_model=FLAGS.d_model,
                          d_ff=FLAGS.d_ff)
  mesh = distributed.make_global_mesh(1, 2)
  host_params = jax.tree.map(np.asarray, workload.skewed_stack(
      jax.random.key(0), cfg, FLAGS.num_layers, skew=FLAGS.skew))
  params, empty_params, timed, train = _build(cfg, mesh, host_params)
  programs = _programs(cfg, mesh)
  oracle_true = [np.asarray(distributed.gather(programs[0](params, h)[2])) for h in timed]
  oracle = [distributed.from_host(t, mesh) for t in oracle_true]
  learned = distributed.from_host(_learned(programs[0], params, train, host_params), mesh)
  runs, fits = _time_policies(programs, params, empty_params, timed, oracle, learned, cfg, mesh)
  if info.is_leader:
    cluster = _median_fit(fits)
    rows = summarise(runs, cluster["flops_per_s"], _flag_dict())
    print_table(rows, cluster, _flag_dict())
    _write(rows, runs, cluster, cores, oracle_true, fits)


if __name__ == "__main__":
  app.run(main)
