"""Recording a decoder-only model's routing traces in both serving phases, from generation.

  prefill, decode = decoder_traces.record(model, batches, max_new_tokens=32,
                                          predictors=("pregate",))
  prefill.true_load.shape     # (batches, MoE layers, E): step s = batch s's prompt pass
  decode.true_load.shape      # (batches * max_new_tokens, MoE layers, E): every decode pass

`model` is any decoder-only `moe_jax.models` model loaded on a mesh whose expert axis is >= 2
(replication needs one; the placements made while recording change no load: the router decides
every token). Each predictor kind is one `model.generate(..., replication=ReplicationConfig(
predictor=kind), return_stats=True)` per batch; its `GenerationStats.layers` hold, per pass and
MoE layer, the true tokens per expert and the load that predictor estimated (`LayerSummary`;
layer 0's estimate is the history, which the simulator recomputes over the trace anyway).
"""

from __future__ import annotations

import numpy as np

from moe_jax import replication
from moe_jax.sim import traces as traces_lib


def generation_loads(model, input_ids, attention_mask, *, max_new_tokens: int,
                     predictor: str = "pregate", num_replica_slots: int = 1,
                     learned: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(true, predicted) <f32>[1 + N, L, E] per pass (pass 0: the prefill) of one greedy generation.

  Args:
    model: a decoder-only model on a mesh (see the module docstring).
    input_ids, attention_mask: <int32>[B, P] left-padded prompts and their mask.
    max_new_tokens: N decode passes (eos never stops a row, so every pass has B rows).
    predictor: the replicating predictor whose estimates are recorded.
    num_replica_slots: r while recording (any r >= 1: the loads do not depend on it).
    learned: the learned predictor's params (predictor="learned" only).
  """
  config = replication.ReplicationConfig(predictor=predictor, num_replica_slots=num_replica_slots)
  _, stats = model.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                            eos_token_id=None, replication=config, learned=learned,
                            return_stats=True)
  passes = int(stats.passes)
  stacks = [stats.layers[name] for name in sorted(stats.layers)]
  take = lambda field: np.concatenate(
      [np.asarray(getattr(s, field), np.float32)[:passes] for s in stacks], axis=1)
  return take("tokens_per_expert"), take("predicted_load")


def record(model, batches, *, max_new_tokens: int, predictors=("pregate",),
           learned: dict | None = None, meta: dict | None = None
           ) -> tuple[traces_lib.Trace, traces_lib.Trace]:
  """(prefill trace, decode trace) of greedy generation over `batches`.

  Args:
    model: a decoder-only model on a mesh.
    batches: [(input_ids <int32>[B, P], attention_mask <int32>[B, P])], every batch one shape.
    max_new_tokens: decode passes per batch.
    predictors: replicating predictor kinds whose estimates are recorded (one generation each).
    learned: params for "learned".
    meta: merged into both traces' meta.

  Returns:
    Prefill: step s = batch s's prompt pass (B * P tokens, pads included: they are routed too).
    Decode: steps = batch 0's N decode passes, then batch 1's, ... (B tokens each).
  """
  if not predictors:
    raise ValueError("record needs at least one predictor kind, e.g. predictors=('pregate',).")
  true, predicted = None, {}
  for kind in predictors:
    loads = [generation_loads(model, ids, mask, max_new_tokens=max_new_tokens, predictor=kind,
                              learned=learned if kind == "learned" else None)
             for ids, mask in batches]
    kind_true = np.stack([t for t, _ in loads])                               # [N_b, 1 + N, L, E]
    if true is not None and not np.array_equal(true, kind_true):
      raise ValueError(f"the true loads recorded with {kind!r} differ from {predictors[0]!r}'s: "
                       "generation is not deterministic here; record one predictor per run.")
    true, predicted[kind] = kind_true, np.stack([p for _, p in loads])
  batch, prompt = np.shape(batches[0][0])
  base = dict(meta or {}, batches=len(batches), batch=int(batch), prompt=int(prompt),
              max_new_tokens=max_new_tokens, top_k=int(model.moe_config.top_k))
  make = lambda part, tokens, phase: traces_lib.Trace(
      true_load=_steps(true[:, part]), predicted={k: _steps(v[:, part]) for k, v in
                                                 predicted.items()},
      tokens_per_step=tokens, top_k=base["top_k"], meta=dict(base, phase=phase))
  return (make(slice(0, 1), int(batch * prompt), "prefill"),
          make(slice(1, None), int(batch), "decode"))


def _steps(loads: np.ndarray) -> np.ndarray:
  """[batches, passes, L, E] -> [batches * passes, L, E] (batch-major)."""
  return loads.reshape((-1,) + loads.shape[2:])
