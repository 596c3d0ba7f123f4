"""Demo: a skewed MoE stack with predictive replication on a mesh that spans processes.

  python launch/local_cluster.py --num_processes=2 --devices_per_process=4 --platform=cpu -- \
      python launch/distributed_demo.py --data=1 --expert=8 --predictor=pregate
  python launch/distributed_demo.py              # the same on one process with 8 CPU devices

Every process builds the same params, feeds its own rows of the batch, and runs one jitted forward
with `--predictor` placing replicas one layer ahead, plus a pass without replicas; process 0 prints
each layer's tokens per device and balancedness, and how far the two outputs differ (replicas
never change the answer).
"""

import _setup

_setup.simulate_cpu_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import moe_jax  # noqa: E402
from moe_jax import distributed, replication  # noqa: E402
from moe_jax.bench import workload  # noqa: E402
from moe_jax.models import moe_stack  # noqa: E402

FLAGS = flags.FLAGS
distributed.define_flags()
flags.DEFINE_integer("data", 1, "data axis size")
flags.DEFINE_integer("expert", None, "expert axis size (default: all devices / data)")
flags.DEFINE_enum("predictor", "pregate", ["history", "pregate", "oracle"], "replica placement")
flags.DEFINE_integer("num_experts", 16, "experts per layer")
flags.DEFINE_integer("num_layers", 3, "MoE layers")
flags.DEFINE_integer("replica_slots", 2, "replica slots per device")
flags.DEFINE_integer("batch", 8, "sequences")
flags.DEFINE_integer("length", 64, "tokens per sequence")


def _forward(cfg, mesh, kind):
  @jax.jit
  def run(params, h, oracle):
    state = replication.init_state({moe_stack.STACK: FLAGS.num_layers}, cfg.num_experts)
    extra = {"oracle_loads": {moe_stack.STACK: oracle}} if kind == "oracle" else {}
    rcfg = replication.ReplicationConfig(predictor=kind, num_replica_slots=FLAGS.replica_slots)
    runner = replication.StackRunner(rcfg, cfg, mesh, moe_stack.moe_layers(params), state,
                                     **extra)
    out, stats = moe_stack.forward(params, h, runner.moe_fn)
    return out, jnp.stack([s.tokens_per_device for s in stats]), jnp.stack(
        [s.tokens_per_expert for s in stats]).astype(jnp.float32)
  return run


def main(argv):
  del argv
  info = distributed.initialize_from_flags()
  mesh = distributed.make_global_mesh(FLAGS.data, FLAGS.expert)
  cfg = moe_jax.MoEConfig(num_experts=FLAGS.num_experts, d_model=64, d_ff=128)
  params = jax.tree.map(np.asarray, workload.skewed_stack(jax.random.key(0), cfg,
                                                          FLAGS.num_layers, skew=1.0))
  params = distributed.from_host(params, mesh)
  x = workload.topic_batch(cfg, FLAGS.batch, FLAGS.length, step=0)
  rows = distributed.local_batch_rows(FLAGS.batch, mesh)
  h = distributed.from_process_local(x[rows], mesh, P("data"), x.shape)
  zeros = distributed.from_host(np.zeros((FLAGS.num_layers, cfg.num_experts), np.float32), mesh)
  plain, plain_devices, true_loads = _forward(cfg, mesh, "none")(params, h, zeros)
  out, devices, _ = _forward(cfg, mesh, FLAGS.predictor)(params, h, true_loads)
  plain, plain_devices, out, devices = distributed.gather((plain, plain_devices, out, devices))
  if not info.is_leader:
    return
  print(f"{info.num_processes} process(es), {len(jax.devices())} devices, mesh "
        f"data={mesh.shape['data']} x expert={mesh.shape['expert']}; predictor={FLAGS.predictor}")
  for layer in range(FLAGS.num_layers):
    print(f"layer {layer}: tokens per device none {plain_devices[layer].ravel().tolist()} "
          f"(balancedness {float(moe_jax.balancedness(plain_devices[layer])):.3f}) -> "
          f"{devices[layer].ravel().tolist()} "
          f"({float(moe_jax.balancedness(devices[layer])):.3f})")
  print(f"max |replicated - plain| / max |plain| = "
        f"{np.max(np.abs(out - plain)) / np.max(np.abs(plain)):.2e}")


if __name__ == "__main__":
  app.run(main)
