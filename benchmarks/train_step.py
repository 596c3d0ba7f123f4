"""Training step time on a skewed MoE stack: the fast grouped matmul vs `dense`, each with and
without `history` replicas.

  python benchmarks/train_step.py [--d_model=256 --d_ff=1024 --num_layers=4 --batch=8
      --length=256 --rounds=5]

Starts itself as 2 processes x 1 pinned CPU core (launch/local_cluster.py; as
benchmarks/straggler.py), builds a mesh data=1 x expert=2 spanning them and a stack of skewed
MoE layers (`moe_jax.bench.workload`, hot experts on the first device), and times one AdamW step
(forward + backward through every MoE layer + update) of four programs on the same batches,
interleaved over the rounds: gmm backend fast ("auto": windowed on CPU) or "dense" x replication
"none" or "history" (the load history carried from step to step, as launch/train.py
--config.train.replication=history does). Reports median step times, their ratios, and the
straggler device's share of the token-choices; checks after the timing, the history warm, that
the four programs give the same loss and gradient norms (the router decides; replicas only move
rows). Process 0 prints the table and
writes JSON to benchmarks/results/.

A benchmark, not a test: the machine is shared, so timings are noisy; one run, read the medians.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout
import _setup  # noqa: E402,F401  (launch-script convention: before anything imports jax)

import subprocess  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bench_io  # noqa: E402  (this directory is on sys.path)
import moe_jax  # noqa: E402
from moe_jax import distributed, host_memory, replicas, replication  # noqa: E402
from moe_jax.bench import workload  # noqa: E402
from moe_jax.models import moe_stack  # noqa: E402

host_memory.reuse_freed_memory()

FLAGS = flags.FLAGS
distributed.define_flags()
flags.DEFINE_integer("d_model", 256, "model width")
flags.DEFINE_integer("d_ff", 1024, "expert hidden width")
flags.DEFINE_integer("num_experts", 8, "experts per layer")
flags.DEFINE_integer("num_layers", 4, "MoE layers in the stack")
flags.DEFINE_integer("replica_slots", 2, "replica slots per device")
flags.DEFINE_integer("batch", 8, "sequences per step (split over the 2 processes)")
flags.DEFINE_integer("length", 256, "tokens per sequence")
flags.DEFINE_float("skew", 0.5, "router skew towards low expert ids (moe_jax.bench.workload)")
flags.DEFINE_integer("steps", 3, "distinct batches per round")
flags.DEFINE_integer("rounds", 5, "timed rounds (after one untimed warm-up call per program)")
flags.DEFINE_bool("pin", True, "pin each process to its own core")
flags.DEFINE_string("out_dir", bench_io.RESULTS_DIR, "where process 0 writes the JSON")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("auto", "dense")
POLICIES = ("none", "history")


def _launch() -> int:
  """Re-runs this script (same flags) as 2 processes x 1 CPU device via launch/local_cluster.py."""
  command = [sys.executable, os.path.join(ROOT, "launch", "local_cluster.py"), "--num_processes=2",
             "--devices_per_process=1", "--platform=cpu", "--", sys.executable,
             os.path.abspath(__file__)] + sys.argv[1:]
  return subprocess.call(command)


def _pin(process_id: int) -> None:
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cores[process_id % len(cores)]})


def _train_step(cfg, mesh, backend: str, policy: str, optimizer):
  """jit((params, opt_state, state, h) -> (params, opt_state, state, loss, grads' norms, straggler
  share)): loss = mean(stack(h)^2) + 0.01 * aux losses."""
  execution = moe_jax.ExecutionConfig(gmm_backend=backend)
  rcfg = replication.ReplicationConfig(predictor=policy, num_replica_slots=FLAGS.replica_slots)

  def loss(params, state, h):
    runner = replication.StackRunner(rcfg, cfg, mesh, moe_stack.moe_layers(params), state,
                                     execution=execution)
    out, stats = moe_stack.forward(params, h, runner.moe_fn)
    aux = sum(s.routing.aux_loss for s in stats)
    per_device = jnp.stack([jnp.sum(s.tokens_per_device, axis=0) for s in stats])   # [n, De]
    share = jnp.max(per_device, axis=1) / jnp.sum(per_device, axis=1)
    return jnp.mean(out ** 2) + 0.01 * aux, (runner.next_state(), jnp.mean(share))

  @jax.jit
  def step(params, opt_state, state, h):
    (value, (state, share)), grads = jax.value_and_grad(loss, has_aux=True)(params, state, h)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    norms = jnp.stack([jnp.linalg.norm(g) for g in jax.tree.leaves(grads)])
    return optax.apply_updates(params, updates), opt_state, state, value, norms, share

  return step


def _setup_run():
  cfg = moe_jax.MoEConfig(num_experts=FLAGS.num_experts, top_k=1, d_model=FLAGS.d_model,
                          d_ff=FLAGS.d_ff)
  mesh = distributed.make_global_mesh(1, 2)
  host_params = jax.tree.map(np.asarray, workload.skewed_stack(
      jax.random.key(0), cfg, FLAGS.num_layers, skew=FLAGS.skew))
  experts = set(replicas.EXPERT_WEIGHT_NAMES)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: distributed.from_host(
          leaf, mesh, P("expert") if path[-1].key in experts else P()), host_params)
  rows = distributed.local_batch_rows(FLAGS.batch, mesh, ("data", "expert"))
  batches = []
  for s in range(FLAGS.steps):
    x = workload.topic_batch(cfg, FLAGS.batch, FLAGS.length, s)
    batches.append(distributed.from_process_local(x[rows], mesh, P(("data", "expert")),
                                                  x.shape))
  return cfg, mesh, params, batches


def _contenders(cfg, mesh, params, batches):
  """(name -> fn() running one step on the next batch, the history state carried; name -> fn()
  giving (loss, grad norms) of a step on the first batch from the carried state, for the
  equality check once the history is warm; name -> straggler shares of the timed steps)."""
  optimizer = optax.adamw(1e-3)
  opt_state = jax.jit(optimizer.init)(params)           # laid out as the params
  contenders, checks, shares = {}, {}, {}
  for backend in BACKENDS:
    for policy in POLICIES:
      name = f"{backend}/{policy}"
      step = _train_step(cfg, mesh, backend, policy, optimizer)
      carry = {"state": distributed.from_host(jax.tree.map(np.asarray, replication.init_state(
          {moe_stack.STACK: FLAGS.num_layers}, cfg.num_experts)), mesh), "i": 0}

      def run(step=step, carry=carry, name=name):
        h = batches[carry["i"] % len(batches)]
        out = step(params, opt_state, carry["state"], h)
        jax.block_until_ready(out)
        carry["state"], carry["i"] = out[2], carry["i"] + 1
        shares.setdefault(name, []).append(out[5])

      def check(step=step, carry=carry):
        out = step(params, opt_state, carry["state"], batches[0])
        return distributed.gather((out[3], out[4]))

      contenders[name], checks[name] = run, check
  return contenders, checks, shares


def _check(checks):
  checks = {name: check() for name, check in checks.items()}
  base_loss, base_norms = checks["auto/none"]
  worst = 0.0
  for name, (value, norms) in checks.items():
    worst = max(worst, float(abs(value - base_loss) / abs(base_loss)),
                float(np.max(np.abs(norms - base_norms) / np.maximum(np.abs(base_norms), 1e-12))))
  if worst > 1e-4:
    raise SystemExit(f"programs disagree: max relative loss/grad-norm difference {worst:.2e}")
  return worst


def main(argv):
  del argv
  if FLAGS.process_id is None and FLAGS.coordinator is None:
    sys.exit(_launch())
  if FLAGS.pin:
    _pin(FLAGS.process_id)
  info = distributed.initialize_from_flags()
  cfg, mesh, params, batches = _setup_run()
  contenders, checks, shares = _contenders(cfg, mesh, params, batches)
  times = bench_io.interleaved_times(contenders, FLAGS.rounds * FLAGS.steps)
  worst = _check(checks)
  if not info.is_leader:
    return
  medians = {name: float(np.median(t)) for name, t in times.items()}
  share = {name: float(np.mean([float(np.asarray(s)) for s in shares[name][1:]]))
           for name in shares}
  base = medians["auto/none"]
  print(f"train step, {FLAGS.num_layers} skewed MoE layers (E={FLAGS.num_experts}, "
        f"d={FLAGS.d_model}, f={FLAGS.d_ff}), batch {FLAGS.batch}x{FLAGS.length}, "
        f"2 processes x 1 core, r={FLAGS.replica_slots}; programs agree to {worst:.1e}")
  print(f"{'program':16s} {'median s':>9s} {'vs auto/none':>13s} {'straggler share':>16s}")
  for name, value in medians.items():
    print(f"{name:16s} {value:9.3f} {value / base:13.2f} {share[name]:16.2f}")
  ratios = {"dense_over_fast": medians["dense/none"] / base,
            "fast_history_over_none": medians["auto/history"] / base,
            "dense_history_over_none": medians["dense/history"] / medians["dense/none"]}
  print("ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
  path = bench_io.write_result("train_step", {
      "flags": {n: getattr(FLAGS, n) for n in ("d_model", "d_ff", "num_experts", "num_layers",
                                               "replica_slots", "batch", "length", "skew",
                                               "steps", "rounds")},
      "medians_s": medians, "times_s": times, "ratios": ratios, "straggler_share": share,
      "max_relative_difference": worst}, out_dir=FLAGS.out_dir)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
