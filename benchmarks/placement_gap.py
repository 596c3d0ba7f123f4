"""Greedy placement vs the exhaustive optimum on small cases (max expected device load).

  python benchmarks/placement_gap.py [--trials=30]

Loads are Zipf(s)-distributed; each case enumerates every valid placement (so keep it tiny).
Prints, per case, the mean and worst ratio greedy / optimum of the max device load.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moe_jax import placement, reference

FLAGS = flags.FLAGS
flags.DEFINE_integer("trials", 30, "random load vectors per case")
flags.DEFINE_float("zipf", 1.2, "Zipf exponent of the loads")

CASES = [(6, 3, 1), (8, 4, 1), (8, 2, 2), (6, 3, 2), (8, 4, 2), (12, 4, 1)]


def main(argv):
  del argv
  place = jax.jit(placement.place, static_argnums=(1, 2))
  rng = np.random.default_rng(0)
  print(f"{'E,D,r':10s} {'trials':>6s} {'mean gap':>9s} {'worst gap':>9s} {'optimal %':>9s}")
  for e, d, r in CASES:
    ratios = []
    for _ in range(FLAGS.trials):
      popularity = 1.0 / np.arange(1, e + 1) ** FLAGS.zipf
      load = rng.multinomial(64 * e, popularity[rng.permutation(e)] / popularity.sum())
      load = load.astype(np.float32)
      best, _ = reference.optimal_placement(load, d, r)
      table = place(jnp.asarray(load), d, r)
      greedy = float(jnp.max(placement.device_load(jnp.asarray(load), table)))
      ratios.append(greedy / best)
    ratios = np.array(ratios)
    print(f"{f'{e},{d},{r}':10s} {len(ratios):6d} {ratios.mean():9.4f} {ratios.max():9.4f} "
          f"{100 * np.mean(ratios < 1 + 1e-5):8.0f}%")


if __name__ == "__main__":
  app.run(main)
