"""Expert-parallel step-time simulator: routing traces + a cluster description -> per-policy time.

  from moe_jax import sim
  trace = sim.traces.load("trace.npz")
  results = sim.simulate(trace, sim.SHAPES["switch_base_128"], sim.CLUSTERS["h100_ib"], 64,
                         tokens_per_device=4096)
  decode = sim.simulate(decode_trace, shape, cluster, 64, tokens_per_device=64, phase="decode")

Modules: `cluster` (ExpertShape, Cluster, presets), `cost` (the per-layer cost model: prefill as
a roofline, decode as weight reads of the slots that got rows + per-row compute), `traces` (the
.npz format, resampling), `policies` (load estimates + placement), `simulate` (the driver),
`fit` (measuring a machine), `validate` (re-costing measured runs), `decoder_traces` (a
decoder-only model's prefill and decode traces, from `model.generate(..., return_stats=True)`).
Switch / synthetic-stack traces are recorded by `moe_jax.bench.record` (with the skewed stacks of
`moe_jax.bench.workload`); sim imports no model code: `decoder_traces` is handed a loaded model.
"""

from moe_jax.sim import cost, policies, traces
from moe_jax.sim.cluster import CLUSTERS, SHAPES, Cluster, ExpertShape
from moe_jax.sim.simulate import PolicyResult, mesh_axes, simulate

__all__ = ["CLUSTERS", "Cluster", "ExpertShape", "PolicyResult", "SHAPES", "cost", "mesh_axes",
           "policies", "simulate", "traces"]
