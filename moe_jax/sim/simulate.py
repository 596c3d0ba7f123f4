"""Per-step EP time of every replication policy on a simulated cluster, from a routing trace.

  trace = sim.traces.load("trace.npz")
  results = sim.simulate(trace, sim.SHAPES["switch_base_128"], sim.CLUSTERS["h100_ib"],
                         num_devices=64, tokens_per_device=4096, num_replica_slots=2)
  results["pregate"].mean_step_s, results["pregate"].ideal_speedup

Meshes: the expert axis is min(devices, E) and the data axis takes the rest (D > E replicates
the experts over data rows, each row its own exchange, as moe_jax's ('data', 'expert') mesh).
Phases: `phase="prefill"` costs each step's experts as a roofline, `"decode"` as weight reads of
the slots that got rows plus per-row compute (see `cost`).
Scaling: with `tokens_per_device` set, each data row's loads are resampled from the trace (see
`traces.resample_rows`); without it the trace is used as recorded (one data row, T_dev = tokens
per step / De), which is how a simulation is compared with a measured run of the same trace.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax.sim import cost
from moe_jax.sim import policies as policies_lib
from moe_jax.sim import traces as traces_lib
from moe_jax.sim.cluster import Cluster, ExpertShape


@dataclasses.dataclass(frozen=True)
class PolicyResult:
  """One policy on one simulated cluster.

  Attributes:
    policy, num_devices, mesh: what was simulated (mesh = (data, expert)).
    step_s: <f64>[S] modelled step time (all MoE layers) of every step.
    mean_step_s: mean over the steps after `warmup_steps`.
    max_device_tokens: <f64>[S, L] token-choices on the busiest device per layer.
    ideal_speedup: sum of the busiest device's tokens under `none` / under this policy
      (the speedup if time were proportional to the straggler's tokens), same steps.
    speedup: mean step time of `none` / of this policy.
    breakdown: mean seconds per step of dense / dispatch / gemm / assemble / combine / overhead
      / exposed prefetch.
  """

  policy: str
  num_devices: int
  mesh: tuple
  step_s: np.ndarray
  mean_step_s: float
  max_device_tokens: np.ndarray
  ideal_speedup: float
  speedup: float
  breakdown: dict


def mesh_axes(num_devices: int, num_experts: int) -> tuple[int, int]:
  """(data, expert) axes for `num_devices`: expert = min(devices, E), data = the rest."""
  expert = min(num_devices, num_experts)
  if num_experts % expert or num_devices % expert:
    raise ValueError(f"{num_devices} devices cannot host {num_experts} experts evenly: the expert "
                     f"axis ({expert}) must divide both; choose a power-of-two device count.")
  return num_devices // expert, expert


def simulate(trace: traces_lib.Trace, shape: ExpertShape, cluster: Cluster, num_devices: int, *,
             policies=policies_lib.POLICIES, tokens_per_device: int | None = None,
             num_replica_slots: int = 2, history_decay: float = 0.8, warmup_steps: int = 1,
             resident_replicas: bool = False, stickiness: float = 0.0,
             assemble_weights: bool = False, phase: str = "prefill", seed: int = 0) -> dict:
  """Simulates every policy on the same (resampled) loads; returns policy -> `PolicyResult`.

  `resident_replicas`: each layer's replica slots keep their weights between steps, so a step only
  moves the replicas whose expert changed (`ReplicationConfig(resident=True)`, stickiness 0; the
  library default refetches every replica every step).
  `stickiness` (resident only): a layer keeps its held table unless a fresh one lowers the
  expected max device load by more than this fraction (`policies.sticky_tables`).
  `assemble_weights`: replicating layers copy home + replica weights into one stack per layer
  (older moe_jax); False models reading them in place (moe_jax now).
  `phase`: "prefill" (roofline gemm) or "decode" (weight reads of the slots with rows + per-row
  compute, `cost.decode_seconds`); for decode, `tokens_per_device` is the sequences each device
  decodes per step.
  """
  if stickiness > 0 and not resident_replicas:
    raise ValueError("stickiness > 0 keeps the previous step's table, which only resident "
                     "replicas remember: pass resident_replicas=True as well.")
  if shape.num_experts != trace.num_experts:
    raise ValueError(f"shape {shape.name} has {shape.num_experts} experts but the trace has "
                     f"{trace.num_experts}; record a trace with that many experts.")
  data, expert = mesh_axes(num_devices, shape.num_experts)
  rows, tokens_per_device = _row_loads(trace, data, expert, tokens_per_device, seed)
  true_global = rows.sum(axis=2)                                            # [S, L, E]
  results = {}
  for policy in policies:
    est = policies_lib.estimates(policy, true_global, trace.predicted, decay=history_decay)
    tables = policies_lib.slot_tables(est, shape.num_experts, expert, num_replica_slots,
                                      true_global.shape[:2])
    tables = policies_lib.sticky_tables(tables, est, stickiness)
    options = dict(replicating=policy != "none", assemble_weights=assemble_weights, phase=phase)
    steps = [_step(rows[s], tables[s], tokens_per_device, shape, cluster,
                   tables[s - 1] if resident_replicas and s > 0 else None, options)
             for s in range(rows.shape[0])]
    results[policy] = steps
  return _summarise(results, num_devices, (data, expert), warmup_steps)


def _row_loads(trace, data, expert, tokens_per_device, seed):
  """(<f64>[S, L, Dd, E] loads per data row, tokens each device is the source of)."""
  if tokens_per_device is None:
    if data != 1:
      raise ValueError("an unscaled trace has one data row; pass tokens_per_device to resample "
                       f"it for {data * expert} devices.")
    return trace.true_load[:, :, None, :].astype(np.float64), trace.tokens_per_step / expert
  choices = int(tokens_per_device * expert * trace.top_k)
  rows = traces_lib.resample_rows(trace.true_load, choices, data, np.random.default_rng(seed))
  return rows, tokens_per_device


def _step(rows, tables, tokens_per_device, shape, cluster, previous_tables, options):
  layers = [cost.layer_cost(rows[l], tables[l], tokens_per_device, shape, cluster,
                            previous_table=None if previous_tables is None else previous_tables[l],
                            **options)
            for l in range(rows.shape[0])]
  return layers, cost.step_cost(layers, cluster)


def _summarise(results, num_devices, mesh, warmup_steps):
  per_policy = {p: _policy_summary(steps, warmup_steps) for p, steps in results.items()}
  base = per_policy.get("none")
  out = {}
  for policy, r in per_policy.items():
    out[policy] = PolicyResult(
        policy=policy, num_devices=num_devices, mesh=mesh, step_s=r["step_s"],
        mean_step_s=r["mean_step_s"], max_device_tokens=r["max_device_tokens"],
        ideal_speedup=base["peak_sum"] / r["peak_sum"] if base else float("nan"),
        speedup=base["mean_step_s"] / r["mean_step_s"] if base else float("nan"),
        breakdown=r["breakdown"])
  return out


def _policy_summary(steps, warmup_steps):
  """Means over the steps after the warm-up (at least the last step is kept)."""
  kept = steps[min(warmup_steps, len(steps) - 1):]
  step_s = np.array([s[1].time_s for s in steps])
  peak = np.stack([s[1].max_device_tokens for s in steps])                  # [S, L]
  breakdown = {name: float(np.mean([sum(getattr(c, f"{name}_s") for c in s[0]) for s in kept]))
               for name in ("dense", "dispatch", "gemm", "assemble", "combine", "overhead")}
  breakdown["exposed_prefetch"] = float(np.mean([s[1].exposed_prefetch_s.sum() for s in kept]))
  return dict(step_s=step_s, mean_step_s=float(np.mean([s[1].time_s for s in kept])),
              max_device_tokens=peak, breakdown=breakdown,
              peak_sum=float(np.sum([s[1].max_device_tokens.sum() for s in kept])))
