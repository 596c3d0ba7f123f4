"""Checking the cost model against measured runs (benchmarks/straggler.py's _runs.npz).

Every measured step is re-costed with the slot tables it actually ran with and the true loads it
actually saw, so any difference is the cost model's (or the machine's noise), not placement's.
"""

from __future__ import annotations

import numpy as np

from moe_jax.sim import cost
from moe_jax.sim.cluster import Cluster, ExpertShape


def straggler_shape(flags: dict) -> ExpertShape:
  """The MoE layer benchmarks/straggler.py runs, from its JSON's flags: f32 relu experts, top-1,
  and per token a dense d x d sublayer plus the d x E router (2 FLOPs per multiply-add)."""
  d, experts = flags["d_model"], flags["num_experts"]
  return ExpertShape("straggler", d, flags["d_ff"], experts, top_k=1, param_bytes=4, act_bytes=4,
                     dense_flops_per_token=2.0 * d * (d + experts))


def load_runs(path: str) -> dict:
  """policy -> {"seconds" [N], "tokens_per_expert" [N, L, E], "slot_table" [N, L, De, S], ...}."""
  runs: dict = {}
  with np.load(path) as f:
    for key in f.files:
      policy, name = key.split("/", 1)
      runs.setdefault(policy, {})[name] = f[key]
  return runs


def simulate_runs(runs: dict, shape: ExpertShape, cluster: Cluster,
                  tokens_per_device: float, *, resident: bool = False,
                  phase: str = "prefill") -> dict:
  """policy -> <f64>[N] modelled seconds of each measured step (one data row).

  resident: the run kept replicas between steps (in run order), so a step moved only the slots
  whose expert differs from the previous step's table; the first step fetched every replica.
  phase: "prefill" or "decode" (`cost.layer_cost`); decode uses the measured rows per slot
  (`tokens_per_slot` [N, L, Dd, De, S]) when the run recorded them."""
  out = {}
  for policy, r in runs.items():
    seconds, previous = [], None
    slots = r.get("tokens_per_slot") if phase == "decode" else None
    for n, (loads, tables) in enumerate(zip(r["tokens_per_expert"], r["slot_table"])):
      layers = [cost.layer_cost(loads[l][None], tables[l], tokens_per_device, shape, cluster,
                                replicating=policy != "none",
                                previous_table=None if previous is None else previous[l],
                                phase=phase, rows_per_slot=None if slots is None else slots[n][l])
                for l in range(loads.shape[0])]
      seconds.append(cost.step_cost(layers, cluster).time_s)
      previous = tables if resident else None
    out[policy] = np.array(seconds)
  return out


def compare(runs: dict, simulated: dict) -> dict:
  """policy -> measured (median, min) vs modelled median, relative errors, speedups vs none.

  On a shared machine the minimum is the least-disturbed run, so both errors are reported. The
  measured speedups: ratio of the medians, of the minima, and the median of the paired ratios
  t_none / t_policy (runs i of both policies ran back to back: benchmarks/straggler.py's
  `speedup`); `speedup_error` = modelled / paired - 1.
  """
  measured = {p: float(np.median(r["seconds"])) for p, r in runs.items()}
  fastest = {p: float(np.min(r["seconds"])) for p, r in runs.items()}
  modelled = {p: float(np.median(s)) for p, s in simulated.items()}
  rows = {}
  for p in runs:
    paired = (float(np.median(runs["none"]["seconds"] / runs[p]["seconds"])) if "none" in runs
              else np.nan)
    simulated_speedup = modelled.get("none", np.nan) / modelled[p]
    rows[p] = dict(measured_s=measured[p], measured_min_s=fastest[p], simulated_s=modelled[p],
                   error=modelled[p] / measured[p] - 1.0,
                   error_vs_min=modelled[p] / fastest[p] - 1.0,
                   measured_speedup=measured.get("none", np.nan) / measured[p],
                   measured_min_speedup=fastest.get("none", np.nan) / fastest[p],
                   measured_paired_speedup=paired, simulated_speedup=simulated_speedup,
                   speedup_error=simulated_speedup / paired - 1.0)
  return rows
