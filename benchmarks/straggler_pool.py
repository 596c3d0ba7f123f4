"""Pools several `benchmarks/straggler.py` runs into one estimate per policy, with an interval.

  python benchmarks/straggler_pool.py benchmarks/results/straggler_A.json straggler_B.json ...

One run's speedup is the median of its paired ratios t_none / t_policy (the policies of one
batch run back to back, so a pair shares the machine's background load); on a shared machine it
still moves by several percent from run to run. This pools the paired ratios of every run given
(same flags apart from --rounds: checked), reports their median with a bootstrap 90% interval
(resampling pairs), and the balance ideal recomputed from all the runs' per-device loads, so the
fraction of the ideal comes with an interval too.
"""

import json
import os

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("resamples", 4000, "bootstrap resamples")
flags.DEFINE_integer("seed", 0, "bootstrap seed")

_MAY_DIFFER = ("rounds",)
_DEFAULTS = {"phase": "prefill"}      # runs from before --phase existed timed prefill steps


def load(path: str) -> tuple[dict, dict]:
  """(report JSON, {array name: array}) of one straggler run, from its .json path."""
  with open(path) as f:
    report = json.load(f)
  runs_path = os.path.join(os.path.dirname(path), report["runs_file"])
  if not os.path.exists(runs_path):
    raise FileNotFoundError(f"{path} names {report['runs_file']}, which is not next to it; "
                            "keep each run's _runs.npz beside its .json.")
  with np.load(runs_path) as runs:
    return report, dict(runs)


def pool(results: list, *, resamples: int = 4000, seed: int = 0) -> dict:
  """policy -> pooled figures, from [(report, runs)] of `load`.

  Returns, per policy other than none: pairs, speedup (median paired ratio), speedup_lo /
  speedup_hi (bootstrap 5th / 95th percentiles of that median), ideal (max device load summed
  over layers and steps under none / under the policy, over every run), and fraction_of_ideal
  with its fraction_lo / fraction_hi.
  """
  first = dict(_DEFAULTS, **results[0][0]["flags"])
  for report, _ in results[1:]:
    other = dict(_DEFAULTS, **report["flags"])
    differ = sorted(k for k in set(first) | set(other)
                    if k not in _MAY_DIFFER and first.get(k) != other.get(k))
    if differ:
      raise ValueError(f"runs with different flags cannot be pooled: {differ}; pool runs of one "
                       "command (only --rounds may differ).")
  peak = lambda runs, p: float(np.max(runs[f"{p}/tokens_per_device"], axis=(2, 3)).sum())
  rng = np.random.default_rng(seed)
  out = {}
  for policy in first["policies"]:
    if policy == "none":
      continue
    ratios = np.concatenate([runs["none/seconds"] / runs[f"{policy}/seconds"]
                             for _, runs in results])
    medians = np.median(rng.choice(ratios, (resamples, ratios.size)), axis=1)
    lo, hi = np.percentile(medians, [5, 95])
    ideal = (sum(peak(runs, "none") for _, runs in results)
             / sum(peak(runs, policy) for _, runs in results))
    speedup = float(np.median(ratios))
    out[policy] = dict(pairs=int(ratios.size), speedup=speedup, speedup_lo=float(lo),
                       speedup_hi=float(hi), ideal=ideal, fraction_of_ideal=speedup / ideal,
                       fraction_lo=float(lo) / ideal, fraction_hi=float(hi) / ideal)
  return out


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give the .json files of straggler runs to pool.")
  rows = pool([load(p) for p in paths], resamples=FLAGS.resamples, seed=FLAGS.seed)
  print(f"pooled {len(paths)} runs: {', '.join(os.path.basename(p) for p in paths)}")
  print(f"{'policy':9s} {'pairs':>5s} {'speedup':>8s} {'90% interval':>14s} {'ideal':>6s} "
        f"{'of ideal':>9s} {'90% interval':>14s}")
  for policy, r in rows.items():
    print(f"{policy:9s} {r['pairs']:5d} {r['speedup']:8.3f} {r['speedup_lo']:6.3f}-"
          f"{r['speedup_hi']:<7.3f} {r['ideal']:6.3f} {r['fraction_of_ideal'] * 100:8.1f}% "
          f"{r['fraction_lo'] * 100:6.1f}-{r['fraction_hi'] * 100:.1f}%")


if __name__ == "__main__":
  app.run(main)
