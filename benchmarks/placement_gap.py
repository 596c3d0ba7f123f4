"""Greedy placement and EPLB vs the exhaustive optimum on small cases (max expected device load).

  python benchmarks/placement_gap.py [--trials=30] [--zipf=1.2] [--write]

Loads are Zipf(s)-distributed token counts; each case enumerates every valid placement (so keep
it tiny). Prints, per case (E experts, D devices, r replica slots, G devices per node for
hierarchical EPLB), the mean and worst ratio placement / optimum of the max device load and how
often each is optimal. Hierarchical rows ("G=2") compare EPLB with two optima: over all
placements (what the greedy and flat EPLB are held to) and over placements whose replicas stay on
their node (the space hierarchical EPLB searches). --write saves the table under results/.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moe_jax import eplb, placement, reference  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("trials", 30, "random load vectors per case")
flags.DEFINE_float("zipf", 1.2, "Zipf exponent of the loads")
flags.DEFINE_bool("write", False, "write the table to benchmarks/results/placement_gap_*.json")

# (E, D, r, devices per node for EPLB; None: flat)
CASES = [(6, 3, 1, None), (8, 4, 1, None), (8, 2, 2, None), (6, 3, 2, None), (8, 4, 2, None),
         (12, 4, 1, None), (8, 4, 1, 2), (8, 4, 2, 2), (12, 4, 1, 2)]


def _max_load(load, table):
  return float(jnp.max(placement.device_load(jnp.asarray(load), jnp.asarray(table))))


def _case(rng, e, d, r, per_node, greedy_place, eplb_place):
  """Ratios {name: [trials]} to the optimum for one case."""
  ratios = {"greedy": [], "eplb": [], "eplb_vs_node_opt": []}
  popularity = 1.0 / np.arange(1, e + 1) ** FLAGS.zipf
  for _ in range(FLAGS.trials):
    load = rng.multinomial(64 * e, popularity[rng.permutation(e)] / popularity.sum())
    load = load.astype(np.float32)
    best, _ = reference.optimal_placement(load, d, r)
    greedy = _max_load(load, greedy_place(jnp.asarray(load), d, r))
    packed = _max_load(load, placement.with_home(
        eplb_place(jnp.asarray(load), d, r, devices_per_node=per_node), e))
    ratios["greedy"].append(greedy / best)
    ratios["eplb"].append(packed / best)
    if per_node:
      node_best, _ = reference.optimal_placement(load, d, r, per_node)
      ratios["eplb_vs_node_opt"].append(packed / node_best)
  return {k: np.array(v) for k, v in ratios.items() if v}


def _summary(ratios):
  return {"mean": float(ratios.mean()), "worst": float(ratios.max()),
          "optimal_pct": float(100 * np.mean(ratios < 1 + 1e-5))}


def main(argv):
  del argv
  greedy_place = jax.jit(placement.place, static_argnums=(1, 2))
  eplb_place = jax.jit(eplb.eplb_columns, static_argnums=(1, 2),
                       static_argnames=("devices_per_node",))
  rng = np.random.default_rng(0)
  print(f"{'E,D,r':8s} {'EPLB':5s} {'trials':>6s} | {'greedy: mean':>12s} {'worst':>6s} "
        f"{'opt%':>5s} | {'EPLB: mean':>10s} {'worst':>6s} {'opt%':>5s} | "
        f"{'EPLB/node-opt: mean':>19s} {'worst':>6s}")
  rows = []
  for e, d, r, per_node in CASES:
    ratios = _case(rng, e, d, r, per_node, greedy_place, eplb_place)
    row = {"experts": e, "devices": d, "replica_slots": r, "devices_per_node": per_node,
           "trials": FLAGS.trials, **{k: _summary(v) for k, v in ratios.items()}}
    rows.append(row)
    g, p = row["greedy"], row["eplb"]
    node = row.get("eplb_vs_node_opt")
    node_text = f"{node['mean']:19.4f} {node['worst']:6.4f}" if node else f"{'-':>19s} {'-':>6s}"
    print(f"{f'{e},{d},{r}':8s} {'flat' if per_node is None else f'G={per_node}':5s} "
          f"{FLAGS.trials:6d} | {g['mean']:12.4f} {g['worst']:6.4f} {g['optimal_pct']:4.0f}% | "
          f"{p['mean']:10.4f} {p['worst']:6.4f} {p['optimal_pct']:4.0f}% | {node_text}")
  if FLAGS.write:
    import bench_io  # pylint: disable=import-outside-toplevel  (this script's directory)
    path = bench_io.write_result("placement_gap", {"zipf": FLAGS.zipf, "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
