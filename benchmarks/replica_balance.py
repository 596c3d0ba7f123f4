"""Balancedness and capacity drops with and without replicas on Zipf-skewed routing (counts, not
time).

  python benchmarks/replica_balance.py [--experts=16 --devices=8 --replica_slots=2 --seeds=5]

For each seed: token choices drawn from Zipf(--zipf) expert popularity (a random expert order), one
MoE layer on a data=1 x expert=D mesh of simulated CPU devices, run with no replica slots and with
the oracle placement (`moe_jax.place` of the true loads). Prints balancedness (mean / max tokens
per device) in dropless mode and dropped choices in capacity mode. Placement is greedy, so a seed
can fall short of the optimum (see benchmarks/placement_gap.py).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
import _setup  # noqa: E402

_setup.simulate_cpu_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import moe_jax  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("experts", 16, "experts")
flags.DEFINE_integer("devices", 8, "devices on the expert axis (at most 8 here)")
flags.DEFINE_integer("replica_slots", 2, "replica slots per device")
flags.DEFINE_integer("tokens", 4096, "tokens per step")
flags.DEFINE_float("zipf", 1.2, "Zipf exponent of expert popularity")
flags.DEFINE_float("capacity_factor", 1.25, "capacity factor of the capacity-mode run")
flags.DEFINE_integer("seeds", 5, "independent routings")


def zipf_routing(rng, tokens: int, experts: int, s: float) -> moe_jax.Routing:
  """Top-1 choices with Zipf(s) popularity over a random expert order; weights uniform in
  [0.2, 1]."""
  popularity = 1.0 / np.arange(1, experts + 1) ** s
  popularity = popularity[rng.permutation(experts)] / popularity.sum()
  ids = rng.choice(experts, size=(tokens, 1), p=popularity).astype(np.int32)
  logits = jnp.zeros((tokens, experts), jnp.float32)
  return moe_jax.Routing(
      expert_ids=jnp.asarray(ids),
      combine_weights=jnp.asarray(rng.uniform(0.2, 1.0, (tokens, 1)), jnp.float32),
      dispatch_mask=jnp.ones((tokens, 1), bool), logits=logits, probs=jax.nn.softmax(logits),
      z_loss=jnp.zeros(()), aux_loss=jnp.zeros(()),
      tokens_per_expert=jnp.asarray(np.bincount(ids.ravel(), minlength=experts), jnp.int32))


def main(argv):
  del argv
  mesh = moe_jax.make_mesh(1, FLAGS.devices, devices=jax.devices()[:FLAGS.devices])
  cfg = moe_jax.MoEConfig(num_experts=FLAGS.experts, d_model=8, d_ff=8)
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  x = jnp.zeros((FLAGS.devices, FLAGS.tokens // FLAGS.devices, 8))
  rng = np.random.default_rng(0)
  print(f"E={FLAGS.experts} D={FLAGS.devices} r={FLAGS.replica_slots} T={FLAGS.tokens} "
        f"Zipf({FLAGS.zipf}); capacity factor {FLAGS.capacity_factor}")
  print(f"{'seed':>4s} {'max/mean expert':>15s} {'balanced none':>13s} {'balanced oracle':>15s} "
        f"{'drops none':>10s} {'drops oracle':>12s}")
  for seed in range(FLAGS.seeds):
    routing = zipf_routing(rng, FLAGS.tokens, FLAGS.experts, FLAGS.zipf)
    load = routing.tokens_per_expert.astype(jnp.float32)
    replicas = moe_jax.prefetch(params, moe_jax.place(
        load, cfg, num_replica_slots=FLAGS.replica_slots, mesh=mesh), cfg, mesh=mesh)
    row = []
    for capacity_mode in ("dropless", "capacity"):
      execution = moe_jax.ExecutionConfig(capacity_mode=capacity_mode,
                                          capacity_factor=FLAGS.capacity_factor)
      _, none = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh,
                                  routing=routing)
      _, oracle = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh,
                                    routing=routing, replicas=replicas)
      row.append((none, oracle))
    (b_none, b_oracle), (c_none, c_oracle) = row
    print(f"{seed:4d} {float(load.max() / load.mean()):15.2f} {float(b_none.balancedness):13.3f} "
          f"{float(b_oracle.balancedness):15.3f} {int(c_none.dropped_choices):10d} "
          f"{int(c_oracle.dropped_choices):12d}")


if __name__ == "__main__":
  app.run(main)
