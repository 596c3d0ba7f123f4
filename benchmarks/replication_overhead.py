"""What replication costs when it places nothing: 2 processes x 1 pinned core, same batch.

  python launch/local_cluster.py --num_processes=2 --devices_per_process=1 --platform=cpu -- \
      python benchmarks/replication_overhead.py [--rounds=8]

The straggler benchmark's stack (d=512, f=2048, E=8, 4 MoE layers, 4096 tokens), timed,
interleaved, as four programs that compute the same thing on one skewed batch:
  none      the layers with no replica slots;
  slots     r replica slots per device, all empty (`empty_replicas`: the layer's cost
            of having slots at all);
  history   the stack runner with the history predictor and resident replicas, from an empty
            history (so it places nothing: the runner's own cost);
  dynamic   the benchmarks' dynamic program (every estimator computed), oracle loads of zero.
Process 0 prints the median and minimum milliseconds of each. Every gap to `none` is overhead
that the balance a replica buys must pay back before replication shows a speedup.
"""

import functools
import os
import time

from absl import app, flags

from moe_jax import distributed, host_memory

host_memory.reuse_freed_memory()   # one device on one pinned core per process

FLAGS = flags.FLAGS
distributed.define_flags()
flags.DEFINE_integer("replica_slots", 2, "replica slots per device")
flags.DEFINE_integer("rounds", 8, "timed rounds")


def _pin(process_id: int) -> None:
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, {cores[process_id % len(cores)]})


def _programs(cfg, num_replica_slots, mesh, params, h):
  """name -> thunk running one step (inputs bound)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moe_jax import moe_layer, replicas  # pylint: disable=import-outside-toplevel
  from moe_jax import replication  # pylint: disable=import-outside-toplevel
  from moe_jax.models import moe_stack  # pylint: disable=import-outside-toplevel
  from moe_jax.moe_fn import DefaultMoE  # pylint: disable=import-outside-toplevel

  layers = moe_stack.moe_layers(params)
  empty = [replicas.empty_replicas(p, num_replica_slots, mesh=mesh)
           for p in layers[moe_stack.STACK]]
  learned = distributed.from_host(
      [{"w": np.zeros((cfg.d_model, cfg.num_experts), np.float32),
        "b": np.zeros((cfg.num_experts,), np.float32)} for _ in range(len(empty) - 1)], mesh)
  zeros = distributed.from_host(np.zeros((len(empty), cfg.num_experts), np.float32), mesh)

  none = jax.jit(lambda p, h: moe_stack.forward(p, h, DefaultMoE(cfg, mesh=mesh))[0])

  @jax.jit
  def slots(p, h, held):
    def moe_fn(stack, index, ff, x, routing):
      del stack
      return moe_layer.moe_apply(ff, x, cfg, mesh=mesh, replicas=held[index], routing=routing)
    return moe_stack.forward(p, h, moe_fn)[0]

  def runner_program(rcfg, extras):
    """A step from a fresh copy of the empty history (so nothing is ever placed); the held
    tables and replicas thread through, donated, as a server would run it."""
    @functools.partial(jax.jit, donate_argnums=(2,))
    def run(p, h, state, extras):
      runner = replication.StackRunner(rcfg, cfg, mesh, moe_stack.moe_layers(p), state, **extras)
      return moe_stack.forward(p, h, runner.moe_fn)[0], runner.next_state()

    held = [replication.with_resident_replicas(
        replication.init_state({moe_stack.STACK: len(empty)}, cfg.num_experts), layers, cfg,
        num_replica_slots, mesh)]
    empty_history = held[0].history

    def step():
      fresh = jax.tree.map(lambda a: a.copy(), empty_history)   # the donated one is consumed
      out, held[0] = run(params, h, held[0].replace(history=fresh), extras)
      return out
    return step

  policy = jnp.int32(replication.policy_index("oracle"))
  dyn_extras = dict(learned={moe_stack.STACK: learned}, oracle_loads={moe_stack.STACK: zeros},
                    policy=policy)
  resident = lambda kind: replication.ReplicationConfig(
      predictor=kind, num_replica_slots=num_replica_slots, resident=True, stickiness=0.1)
  return {"none": lambda: none(params, h), "slots": lambda: slots(params, h, empty),
          "history": runner_program(resident("history"), {}),
          "dynamic": runner_program(resident("dynamic"), dyn_extras)}


def main(argv):
  del argv
  if FLAGS.process_id is None:
    raise app.UsageError("start it through launch/local_cluster.py (see the module docstring)")
  _pin(FLAGS.process_id)
  info = distributed.initialize_from_flags()
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  import moe_jax  # pylint: disable=import-outside-toplevel
  from moe_jax import replicas  # pylint: disable=import-outside-toplevel
  from moe_jax.bench import workload  # pylint: disable=import-outside-toplevel

  cfg = moe_jax.MoEConfig(num_experts=8, top_k=1, d_model=512, d_ff=2048)
  mesh = distributed.make_global_mesh(1, 2)
  host = jax.tree.map(np.asarray, workload.skewed_stack(jax.random.key(0), cfg, 4, skew=0.5))
  expert_names = set(replicas.EXPERT_WEIGHT_NAMES)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: distributed.from_host(
          leaf, mesh, P("expert") if path[-1].key in expert_names else P()), host)
  x = workload.topic_batch(cfg, 8, 512, 0)
  rows = distributed.local_batch_rows(8, mesh, ("data", "expert"))
  h = distributed.from_process_local(x[rows], mesh, P(("data", "expert")), x.shape)
  programs = _programs(cfg, FLAGS.replica_slots, mesh, params, h)
  times = {name: [] for name in programs}
  for run in programs.values():
    jax.block_until_ready(run())
  for index in range(FLAGS.rounds):
    for name, run in programs.items():
      distributed.barrier(f"{name}-{index}")
      start = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - start)
  if info.is_leader:
    base = np.median(times["none"])
    for name, t in times.items():
      print(f"{name:8s} median {np.median(t) * 1e3:7.1f} ms  min {np.min(t) * 1e3:7.1f} ms  "
            f"median / none {np.median(t) / base:5.3f}")


if __name__ == "__main__":
  app.run(main)
