"""Checking the cost model against measured runs (benchmarks/straggler.py's _runs.npz).

Every measured step is re-costed with the slot tables it actually ran with and the true loads it
actually saw, so any difference is the cost model's (or the machine's noise), not placement's.
"""

from __future__ import annotations

import numpy as np

from moe_jax.sim import cost
from moe_jax.sim.cluster import Cluster, ExpertShape


def load_runs(path: str) -> dict:
  """policy -> {"seconds" [N], "tokens_per_expert" [N, L, E], "slot_table" [N, L, De, S], ...}."""
  runs: dict = {}
  with np.load(path) as f:
    for key in f.files:
      policy, name = key.split("/", 1)
      runs.setdefault(policy, {})[name] = f[key]
  return runs


def simulate_runs(runs: dict, shape: ExpertShape, cluster: Cluster,
                  tokens_per_device: float, *, resident: bool = False) -> dict:
  """policy -> <f64>[N] modelled seconds of each measured step (one data row).

  resident: the run kept replicas between steps (in run order), so a step moved only the slots
  whose expert differs from the previous step's table; the first step fetched every replica."""
  out = {}
  for policy, r in runs.items():
    seconds, previous = [], None
    for loads, tables in zip(r["tokens_per_expert"], r["slot_table"]):
      layers = [cost.layer_cost(loads[l][None], tables[l], tokens_per_device, shape, cluster,
                                replicating=policy != "none",
                                previous_table=None if previous is None else previous[l])
                for l in range(loads.shape[0])]
      seconds.append(cost.step_cost(layers, cluster).time_s)
      previous = tables if resident else None
    out[policy] = np.array(seconds)
  return out


def compare(runs: dict, simulated: dict) -> dict:
  """policy -> measured (median, min) vs modelled median, relative errors, speedups vs none.

  On a shared machine the minimum is the least-disturbed run, so both errors are reported.
  """
  measured = {p: float(np.median(r["seconds"])) for p, r in runs.items()}
  fastest = {p: float(np.min(r["seconds"])) for p, r in runs.items()}
  modelled = {p: float(np.median(s)) for p, s in simulated.items()}
  rows = {}
  for p in runs:
    rows[p] = dict(measured_s=measured[p], measured_min_s=fastest[p], simulated_s=modelled[p],
                   error=modelled[p] / measured[p] - 1.0,
                   error_vs_min=modelled[p] / fastest[p] - 1.0,
                   measured_speedup=measured.get("none", np.nan) / measured[p],
                   measured_min_speedup=fastest.get("none", np.nan) / fastest[p],
                   simulated_speedup=modelled.get("none", np.nan) / modelled[p])
  return rows
