"""Demo: one expert-parallel MoE layer on a (data=2, expert=4) mesh, checked against the oracle.

  python launch/demo_layer.py [--num_experts=16 --top_k=2 --capacity_mode=capacity]
  python launch/local_cluster.py --num_processes=2 --devices_per_process=4 -- \
      python launch/demo_layer.py             # the same mesh spread over 2 processes
"""

import _setup

_setup.simulate_cpu_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

import moe_jax  # noqa: E402
from moe_jax import distributed, reference  # noqa: E402
from moe_jax.app.config import UsageError  # noqa: E402
from moe_jax.config import CAPACITY_MODES  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_experts", 16, "experts")
flags.DEFINE_integer("top_k", 1, "experts per token")
flags.DEFINE_enum("capacity_mode", "dropless", list(CAPACITY_MODES),
                  "dropless, or capacity (fixed per-slot buffers; the overflow is dropped)")
flags.DEFINE_integer("data", 2, "data axis size")
flags.DEFINE_integer("expert", 4, "expert axis size")


def main(argv):
  del argv
  try:
    cfg = moe_jax.MoEConfig(num_experts=FLAGS.num_experts, top_k=FLAGS.top_k, d_model=64,
                            d_ff=128)
    execution = moe_jax.ExecutionConfig(capacity_mode=FLAGS.capacity_mode)
    if jax.process_count() > 1:   # every process runs this; the mesh spans all of them
      mesh = distributed.make_global_mesh(FLAGS.data, FLAGS.expert)
    else:
      mesh = moe_jax.make_mesh(data=FLAGS.data, expert=FLAGS.expert)
    if cfg.num_experts % FLAGS.expert:
      raise ValueError(f"--num_experts={cfg.num_experts} is not divisible by --expert="
                       f"{FLAGS.expert}; change one of them.")
  except ValueError as e:   # a flag value: one line (the library names the argument)
    raise UsageError(f"{e} (flags --num_experts, --top_k, --data, --expert)") from None
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)   # same seed: same values everywhere
  x = jax.random.normal(jax.random.key(1), (8, 32, cfg.d_model))
  x = x.at[..., :4].add(1.5)  # a shared component makes the router's choices skewed
  y, stats = distributed.gather(moe_jax.moe_apply(params, x, cfg, execution=execution,
                                                  mesh=mesh))
  if jax.process_index() != 0:
    return
  r = stats.routing
  oracle = reference.dense_moe(params, x.reshape(-1, cfg.d_model), r.expert_ids,
                               r.combine_weights, r.dispatch_mask, activation=cfg.activation)
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform} in "
        f"{jax.process_count()} process(es); mesh "
        f"data={FLAGS.data} x expert={FLAGS.expert}; {cfg.num_experts} experts, top-{cfg.top_k}, "
        f"{execution.capacity_mode}")
  print(f"tokens per expert: {np.asarray(stats.tokens_per_expert).tolist()}")
  print(f"tokens per device [data, expert]: {np.asarray(stats.tokens_per_device).tolist()}")
  print(f"balancedness (mean/max per device): {float(stats.balancedness):.3f}; "
        f"dropped choices: {int(stats.dropped_choices)} of {int(stats.total_choices)}")
  if execution.dropless:
    err = float(np.max(np.abs(np.asarray(y).reshape(-1, cfg.d_model) - np.asarray(oracle))))
    print(f"max |moe_apply - dense oracle| = {err:.2e}")


if __name__ == "__main__":
  _setup.run(main)
