"""Expert-parallel step-time simulator: routing traces + a cluster description -> per-policy time.

  from moe_jax import sim
  trace = sim.traces.load("trace.npz")
  results = sim.simulate(trace, sim.SHAPES["switch_base_128"], sim.CLUSTERS["h100_ib"], 64,
                         tokens_per_device=4096)

Modules: `cluster` (ExpertShape, Cluster, presets), `cost` (the per-layer cost model), `traces`
(the .npz format, resampling), `policies` (load estimates + placement), `simulate` (the driver).
It only turns traces into costs: recording traces by running a model is `moe_jax.bench.record`
(with the synthetic skewed stacks of `moe_jax.bench.workload`).
"""

from moe_jax.sim import cost, policies, traces
from moe_jax.sim.cluster import CLUSTERS, SHAPES, Cluster, ExpertShape
from moe_jax.sim.simulate import PolicyResult, mesh_axes, simulate

__all__ = ["CLUSTERS", "Cluster", "ExpertShape", "PolicyResult", "SHAPES", "cost", "mesh_axes",
           "policies", "simulate", "traces"]
