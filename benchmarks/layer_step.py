"""Step time of one MoE layer on CPU: dropless vs capacity vs the dense oracle, side by side.

  python benchmarks/layer_step.py [--tokens=4096 --d_model=768 --d_ff=3072 --num_experts=16]

Each contender is jitted, warmed up, then timed in interleaved rounds; medians are reported with
their ratio to an ideal dense FFN of equal FLOPs (every token through one FFN once per choice).
This is a benchmark script, not a test: the machine is shared and timings are noisy.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
import _setup  # noqa: E402

_setup.simulate_cpu_devices(8)

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import moe_jax  # noqa: E402
from moe_jax import experts, reference  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 4096, "tokens per step")
flags.DEFINE_integer("d_model", 768, "model width")
flags.DEFINE_integer("d_ff", 3072, "expert hidden width")
flags.DEFINE_integer("num_experts", 16, "experts")
flags.DEFINE_integer("top_k", 1, "experts per token")
flags.DEFINE_integer("rounds", 5, "timed rounds per contender")
flags.DEFINE_string("mesh", "1x1,1x8", "comma-separated data x expert meshes")
flags.DEFINE_bool("oracle", True, "also time the dense oracle (E x the FLOPs)")


def _time(fn, *args, rounds):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def main(argv):
  del argv
  base = moe_jax.MoEConfig(num_experts=FLAGS.num_experts, top_k=FLAGS.top_k,
                           d_model=FLAGS.d_model, d_ff=FLAGS.d_ff)
  params = moe_jax.init_moe_params(jax.random.key(0), base)
  x = jax.random.normal(jax.random.key(1), (8, FLAGS.tokens // 8, FLAGS.d_model))
  x = x.at[..., :8].add(1.0)  # skewed routing
  contenders = {}
  for mesh_name in FLAGS.mesh.split(","):
    data, expert = (int(v) for v in mesh_name.split("x"))
    mesh = moe_jax.make_mesh(data, expert)
    for mode in ("dropless", "capacity"):
      execution = moe_jax.ExecutionConfig(capacity_mode=mode)
      contenders[f"{mode} {mesh_name}"] = jax.jit(
          lambda p, x, execution=execution, mesh=mesh: moe_jax.moe_apply(
              p, x, base, execution=execution, mesh=mesh))
  tokens = x.reshape(-1, FLAGS.d_model)
  ideal = jax.jit(lambda p, t: experts.ffn(t, p["wi"][0], p["wo"][0], None, "relu"))
  contenders["dense ideal (1 FFN, equal FLOPs)"] = lambda p, x: ideal(p, jnp.tile(
      tokens, (FLAGS.top_k, 1)))
  if FLAGS.oracle:
    routing = moe_jax.top_k_route(tokens, params["router"], top_k=FLAGS.top_k)
    oracle = jax.jit(lambda p, t: reference.dense_moe(
        p, t, routing.expert_ids, routing.combine_weights, routing.dispatch_mask,
        activation="relu"))
    contenders["dense oracle (every expert, every token)"] = lambda p, x: oracle(p, tokens)
  times = {name: [] for name in contenders}
  for name, fn in contenders.items():
    jax.block_until_ready(fn(params, x))                       # compile + warm up
  for _ in range(FLAGS.rounds):                                # interleaved rounds
    for name, fn in contenders.items():
      times[name] += _time(fn, params, x, rounds=1)
  ideal_ms = np.median(times["dense ideal (1 FFN, equal FLOPs)"]) * 1e3
  print(f"\nT={FLAGS.tokens} d={FLAGS.d_model} f={FLAGS.d_ff} E={FLAGS.num_experts} "
        f"k={FLAGS.top_k}, {len(jax.devices())} {jax.devices()[0].platform} devices, "
        f"median of {FLAGS.rounds}")
  print(f"{'contender':44s} {'ms':>9s} {'x ideal':>8s}")
  for name, ts in times.items():
    ms = np.median(ts) * 1e3
    print(f"{name:44s} {ms:9.1f} {ms / ideal_ms:8.2f}")
  _, stats = contenders["capacity " + FLAGS.mesh.split(",")[0]](params, x)
  print(f"capacity mode dropped {int(stats.dropped_choices)} of {int(stats.total_choices)} "
        "token-choices at capacity_factor 1.25")


if __name__ == "__main__":
  app.run(main)
