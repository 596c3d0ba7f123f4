"""Routing traces: per step, per MoE layer, token-choices per expert (and predicted loads).

  trace = traces.load("benchmarks/results/traces/stack_e128.npz")
  trace.true_load.shape          # (steps, layers, E)
  trace.predicted["pregate"]     # same shape: what that predictor estimated for each layer

File format (.npz): `true_load` <f32>[S, L, E]; `predicted_<kind>` <f32>[S, L, E] for every
recorded predictor (layer 0 of pregate/learned is all zeros: nothing precedes it);
`tokens_per_step` and `top_k` scalars; `meta` a JSON string (what produced the trace).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np


@dataclasses.dataclass
class Trace:
  """Recorded routing of a model over `steps` batches.

  Attributes:
    true_load: <f32>[S, L, E] token-choices the router sent to each expert.
    predicted: kind -> <f32>[S, L, E] the load each predictor estimated for layer l (from layer
      l - 1's input); any scale, placement only uses proportions.
    tokens_per_step: tokens in one step's batch (true_load sums to this times top_k).
    top_k: experts per token.
    meta: free-form description (model, sizes, seed).
  """

  true_load: np.ndarray
  predicted: dict
  tokens_per_step: int
  top_k: int
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.true_load = np.asarray(self.true_load, np.float32)
    if self.true_load.ndim != 3:
      raise ValueError(f"true_load must be [steps, layers, experts], got shape "
                       f"{self.true_load.shape}.")
    for kind, load in self.predicted.items():
      if np.shape(load) != self.true_load.shape:
        raise ValueError(f"predicted[{kind!r}] has shape {np.shape(load)}, expected "
                         f"{self.true_load.shape} like true_load.")

  @property
  def num_steps(self) -> int:
    return self.true_load.shape[0]

  @property
  def num_layers(self) -> int:
    return self.true_load.shape[1]

  @property
  def num_experts(self) -> int:
    return self.true_load.shape[2]


def save(path: str, trace: Trace) -> None:
  arrays = {f"predicted_{k}": np.asarray(v, np.float32) for k, v in trace.predicted.items()}
  np.savez_compressed(path, true_load=trace.true_load, tokens_per_step=trace.tokens_per_step,
                      top_k=trace.top_k, meta=json.dumps(trace.meta), **arrays)


def load(path: str) -> Trace:
  with np.load(path) as f:
    predicted = {k[len("predicted_"):]: f[k] for k in f.files if k.startswith("predicted_")}
    return Trace(true_load=f["true_load"], predicted=predicted,
                 tokens_per_step=int(f["tokens_per_step"]), top_k=int(f["top_k"]),
                 meta=json.loads(str(f["meta"])))


def resample_rows(true_load: np.ndarray, choices_per_row: int, num_rows: int,
                  rng: np.random.Generator) -> np.ndarray:
  """<f64>[S, L, R, E] per-data-row loads at a new token count, drawn from the trace's mix.

  Each row's token-choices are a multinomial draw with the recorded step's per-layer expert
  frequencies: the skew and its step-to-step drift are kept, while the count per device grows or
  shrinks to what the simulated cluster would see (sampling noise shrinks as 1/sqrt(count)).

  Args:
    true_load: <f>[S, L, E] recorded loads.
    choices_per_row: token-choices per data row after scaling (tokens per row * top_k).
    num_rows: Dd, rows of the data axis, each an independent draw.
    rng: numpy generator (fixed seed: every policy sees the same draws).
  """
  load = np.asarray(true_load, np.float64)
  probs = load / np.maximum(load.sum(axis=-1, keepdims=True), 1e-30)
  steps, layers, experts = probs.shape
  flat = probs.reshape(-1, experts)
  draws = np.stack([rng.multinomial(choices_per_row, p, size=num_rows) for p in flat])
  return draws.reshape(steps, layers, num_rows, experts).astype(np.float64)
