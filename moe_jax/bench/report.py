"""Turn benchmark runs into report.json and a compact table (metrics: moe_jax.metrics)."""

from __future__ import annotations

import json
import math

import numpy as np

from moe_jax import metrics
from moe_jax import predictor as predictor_lib

APPROX = "seed_approx"      # the approximate mode's row (`moe_jax.bench.programs.APPROX`)


def layer_metrics(records_per_batch: list, stack: str, index: int) -> dict:
  """Metrics of one MoE layer over all batches of one policy."""
  recs = [batch[stack][index] for batch in records_per_batch]
  per_device = [np.asarray(r.stats.tokens_per_device, np.float64) for r in recs]
  true = [np.asarray(r.stats.tokens_per_expert, np.float64) for r in recs]
  hits = [metrics.hit_rate(r.predicted_top1, r.stats.routing.expert_ids) for r in recs]
  errors = [metrics.load_l1_error(r.predicted_load, t) for r, t in zip(recs, true)]
  dropped = sum(int(r.stats.dropped_choices) for r in recs)
  total = sum(int(r.stats.total_choices) for r in recs)
  return {
      "balancedness": float(np.mean([float(metrics.balancedness(d)) for d in per_device])),
      "maxvio": float(np.mean([float(metrics.maxvio(d)) for d in per_device])),
      "max_device_tokens": float(np.sum([d.max() for d in per_device])),
      "drop_rate": metrics.drop_rate(dropped, total),
      "hit_rate": nanmean(hits),
      "load_l1_error": nanmean(errors),
      "replica_bytes": float(np.sum([float(r.fetched_bytes) for r in recs])),
      "tokens_per_expert": np.sum(true, axis=0).tolist(),
      "tokens_per_device": np.sum([d.reshape(-1) for d in per_device], axis=0).tolist(),
  }


def prefetch_lead(policy: str, layer_counts: list[int]) -> tuple[str, float]:
  """(label, lead): how early a policy's placement + prefetch of a layer can be issued.

  lead = mean over the MoE layers l >= 1 of each stack of how many MoE layers ahead of layer l
  it depends on nothing later (the part of the model before a stack's first MoE layer counts as
  one): seed reads the stack's embeddings, so l + 1; one-layer-ahead kinds read layer l - 1's
  input, so 1; reactive waits for layer l's own router, so 0; kinds that read past batches can
  be issued before the batch (inf); none and oracle: NaN (nothing to fetch / not a policy).
  """
  kind = "seed" if policy == APPROX else policy
  if kind not in predictor_lib.PREDICTORS:
    return "-", float("nan")
  source = predictor_lib.PREDICTORS[kind].source
  later = [l for n in layer_counts for l in range(1, n)]
  if source == "embedding":
    lead = float(np.mean([l + 1 for l in later])) if later else float("nan")
    return f"emb {lead:.1f}L", lead
  return {"history": ("batch", float("inf")), "calibration": ("batch", float("inf")),
          "hidden_state": ("1L", 1.0), "in_layer": ("in layer", 0.0),
          "truth": ("-", float("nan"))}[source]


def quality(result: dict, reference: dict) -> dict:
  """The approximate mode's loss metrics vs the exact model's on the same batches: "kept" =
  its next-token accuracy / the exact model's; exact policies keep 1.0 by construction (their
  outputs equal none's: `output_rel_diff_vs_none`)."""
  if not result.get("quality"):
    return {"kept": 1.0}
  own = {k: float(np.mean([q[k] for q in result["quality"]])) for k in ("ce", "accuracy")}
  exact = {k: float(np.mean([q[k] for q in reference["quality"]])) for k in ("ce", "accuracy")}
  return {"kept": own["accuracy"] / exact["accuracy"], "ce": own["ce"],
          "accuracy": own["accuracy"], "exact_ce": exact["ce"],
          "exact_accuracy": exact["accuracy"]}


def policy_report(result: dict, reference: dict, stacks: list, policy: str = "") -> dict:
  """Per-layer and overall metrics of one policy; `reference` is the `none` policy's result;
  `stacks` the model's stack names in its order."""
  layers, none_max = {}, 0.0
  for stack in stacks:
    for index in range(len(result["records"][0][stack])):
      layers[f"{stack}/{index}"] = layer_metrics(result["records"], stack, index)
      none_max += layer_metrics(reference["records"], stack, index)["max_device_tokens"]
  own_max = sum(v["max_device_tokens"] for v in layers.values())
  seconds = float(np.median(result["seconds"])) if result["seconds"] else float("nan")
  overall = {
      "balancedness": float(np.mean([v["balancedness"] for v in layers.values()])),
      "maxvio": float(np.mean([v["maxvio"] for v in layers.values()])),
      "drop_rate": float(np.mean([v["drop_rate"] for v in layers.values()])),
      "hit_rate": nanmean([v["hit_rate"] for v in layers.values()]),
      "load_l1_error": nanmean([v["load_l1_error"] for v in layers.values()]),
      "replica_bytes": float(sum(v["replica_bytes"] for v in layers.values())),
      "tokens_per_second": result["tokens"] / seconds if seconds > 0 else float("nan"),
      "seconds_median": seconds,
      "output_rel_diff_vs_none": result["logits_rel_diff"],
      "modelled_ep_speedup_vs_none": none_max / own_max if own_max > 0 else float("nan"),
      "exact": policy != APPROX,
      "quality": quality(result, reference),
  }
  counts = [len(result["records"][0][stack]) for stack in stacks]
  overall["prefetch_from"], overall["prefetch_lead_layers"] = prefetch_lead(policy, counts)
  return {"overall": overall, "layers": layers}


def build_report(runs: dict, meta: dict) -> dict:
  """runs: capacity mode -> policy -> result (harness.run_mode); meta["stacks"]: stack names."""
  report = {"meta": meta, "modes": {}}
  for mode, results in runs.items():
    report["modes"][mode] = {p: policy_report(r, results["none"], meta["stacks"], p)
                             for p, r in results.items()}
    oracle = report["modes"][mode].get("oracle")
    for own in (r["overall"] for r in report["modes"][mode].values()):
      own["balancedness_vs_oracle"] = (own["balancedness"] / oracle["overall"]["balancedness"]
                                       if oracle is not None else float("nan"))
  return report


def write_json(report: dict, path: str) -> None:
  with open(path, "w") as f:
    json.dump(_finite(report), f, indent=1)


def table(report: dict) -> str:
  """A compact text table: one row per (mode, policy)."""
  head = (f"{'mode':9s} {'policy':11s} {'balanced':>8s} {'/oracle':>7s} {'maxvio':>6s} "
          f"{'drop%':>6s} {'hit':>5s} {'L1err':>6s} {'MB moved':>8s} {'prefetch':>9s} "
          f"{'tok/s':>7s} {'reldiff':>8s} {'quality':>7s} {'EP speedup':>10s}")
  rows = [head, "-" * len(head)]
  for mode, policies in report["modes"].items():
    for policy, r in policies.items():
      o = r["overall"]
      reldiff = ("approx" if not o.get("exact", True)
                 else f"{o['output_rel_diff_vs_none']:.1e}")
      rows.append(
          f"{mode:9s} {policy:11s} {o['balancedness']:8.3f} "
          f"{fmt(o.get('balancedness_vs_oracle'), 7, 3)} {o['maxvio']:6.2f} "
          f"{100 * o['drop_rate']:6.2f} {fmt(o['hit_rate'], 5, 2)} {fmt(o['load_l1_error'], 6, 2)} "
          f"{o['replica_bytes'] / 1e6:8.1f} {o.get('prefetch_from', '-'):>9s} "
          f"{o['tokens_per_second']:7.0f} {reldiff:>8s} "
          f"{100 * o.get('quality', {}).get('kept', 1.0):6.1f}% "
          f"{o['modelled_ep_speedup_vs_none']:10.2f}")
  return "\n".join(rows)


def fmt(x, width, digits):
  return f"{'-':>{width}s}" if x is None or (isinstance(x, float) and math.isnan(x)) else \
      f"{x:{width}.{digits}f}"


def nanmean(values):
  values = [v for v in values if v is not None and not math.isnan(v)]
  return float(np.mean(values)) if values else float("nan")


def _finite(obj):
  """JSON has no NaN: write null instead."""
  if isinstance(obj, float):
    return None if math.isnan(obj) or math.isinf(obj) else obj
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj
