"""The decode phase's part of report.json and its table (metric definitions: moe_jax.metrics).

Per policy the same shape as a prefill policy report ({"overall", "layers"}, so the plots read
both), from the `LayerSummary`s of every decode step (`bench.decode.run_decode`): per-layer
numbers pool every step of every batch; "overall" adds per-step series (replica bytes moved,
balancedness), decode tokens/s and the fraction of generated tokens equal to `none`'s.
"""

from __future__ import annotations

import jax
import numpy as np

from moe_jax import metrics
from moe_jax.bench import report as report_lib


def layer_metrics(summaries: list, stack: str, index: int) -> dict:
  """Metrics of one MoE layer over every decode step of every batch.

  Args:
    summaries: per batch, stack -> `LayerSummary` (numpy) with leading axes [N steps, n layers].
  """
  pick = lambda name: np.concatenate([np.asarray(getattr(b[stack], name))[:, index]
                                      for b in summaries]).astype(np.float64)
  per_device = pick("tokens_per_device").reshape(-1, np.prod(
      np.shape(summaries[0][stack].tokens_per_device)[2:]))             # [S, D] S: all steps
  true, predicted = pick("tokens_per_expert"), pick("predicted_load")  # [S, E]
  predicted_count = pick("top1_predicted").sum()
  errors = [metrics.load_l1_error(p, t) for p, t in zip(predicted, true)]
  return {
      "balancedness": float(np.mean(jax.vmap(metrics.balancedness)(per_device))),
      "maxvio": float(np.mean(jax.vmap(metrics.maxvio)(per_device))),
      "max_device_tokens": float(per_device.max(axis=1).sum()),
      "drop_rate": metrics.drop_rate(pick("dropped_choices").sum(), true.sum()),
      "hit_rate": (float(pick("top1_hits").sum() / predicted_count) if predicted_count > 0
                   else float("nan")),
      "load_l1_error": report_lib.nanmean(errors),
      "replica_bytes": float(pick("fetched_bytes").sum()),
      "replica_rows": int(pick("replica_rows").sum()),
      "tokens_per_expert": true.sum(axis=0).tolist(),
      "tokens_per_device": per_device.sum(axis=0).tolist(),
  }


def policy_report(result: dict, reference: dict, stacks: list) -> dict:
  """Per-layer and overall decode metrics of one policy; `reference` is `none`'s result."""
  layers, none_max = {}, 0.0
  for stack in stacks:
    for index in range(np.shape(result["summaries"][0][stack].fetched_bytes)[1]):
      layers[f"{stack}/{index}"] = layer_metrics(result["summaries"], stack, index)
      none_max += layer_metrics(reference["summaries"], stack, index)["max_device_tokens"]
  own_max = sum(v["max_device_tokens"] for v in layers.values())
  steps, batches = result["steps"], len(result["summaries"])
  seconds = float(np.median(result["seconds"])) if result["seconds"] else float("nan")
  overall = {
      "balancedness": float(np.mean([v["balancedness"] for v in layers.values()])),
      "maxvio": float(np.mean([v["maxvio"] for v in layers.values()])),
      "drop_rate": float(np.mean([v["drop_rate"] for v in layers.values()])),
      "hit_rate": report_lib.nanmean([v["hit_rate"] for v in layers.values()]),
      "load_l1_error": report_lib.nanmean([v["load_l1_error"] for v in layers.values()]),
      "replica_bytes": float(sum(v["replica_bytes"] for v in layers.values())),
      "replica_bytes_per_step": float(sum(v["replica_bytes"] for v in layers.values())
                                      / (steps * batches)),
      "replica_bytes_per_step_series": _series(result["summaries"], "fetched_bytes").tolist(),
      "balancedness_per_step_series": _balance_series(result["summaries"]).tolist(),
      "tokens_per_second": result["timed_tokens"] / seconds if seconds > 0 else float("nan"),
      "seconds_median": seconds,
      "step_ms": 1e3 * seconds / (batches * (steps - 1)) if steps > 1 else float("nan"),
      "generate_seconds_median": float(np.median(result["generate_seconds"]))
                                 if result["generate_seconds"] else float("nan"),
      "same_tokens_as_none": result["same_tokens"],
      "modelled_ep_speedup_vs_none": none_max / own_max if own_max > 0 else float("nan"),
  }
  return {"overall": overall, "layers": layers}


def build(runs: dict, stacks: list) -> dict:
  """runs: capacity mode -> policy -> result (`decode.run_decode`) -> the report's "decode"."""
  return {mode: {p: policy_report(r, results["none"], stacks) for p, r in results.items()}
          for mode, results in runs.items()}


def _series(summaries: list, name: str) -> np.ndarray:
  """<f64>[N] per decode step: `name` summed over stacks and layers, averaged over batches."""
  return np.mean([sum(np.asarray(getattr(s, name), np.float64).reshape(
      np.shape(s.fetched_bytes)[0], -1).sum(axis=1) for s in b.values()) for b in summaries],
                 axis=0)


def _balance_series(summaries: list) -> np.ndarray:
  """<f64>[N] per decode step: balancedness averaged over MoE layers and batches."""
  per_batch = []
  for b in summaries:
    devices = np.concatenate([np.asarray(s.tokens_per_device, np.float64).reshape(
        *np.shape(s.fetched_bytes), -1) for s in b.values()], axis=1)   # [N, layers, D]
    flat = devices.reshape(-1, devices.shape[-1])
    per_batch.append(np.asarray(jax.vmap(metrics.balancedness)(flat)).reshape(
        devices.shape[:2]).mean(axis=1))
  return np.mean(per_batch, axis=0)


def table(decode: dict) -> str:
  """One row per (mode, policy): `MB/step` per decode step (all MoE layers), `ms/step` and `tok/s`
  of the decode steps alone, `same tok`: fraction of generated tokens equal to none's."""
  head = (f"{'mode':9s} {'policy':12s} {'balanced':>8s} {'maxvio':>7s} {'drop%':>6s} {'hit':>5s} "
          f"{'L1err':>6s} {'MB/step':>8s} {'ms/step':>7s} {'tok/s':>7s} {'same tok':>8s} "
          f"{'EP speedup':>10s}")
  rows = [head, "-" * len(head)]
  for mode, policies in decode.items():
    for policy, r in policies.items():
      o = r["overall"]
      rows.append(
          f"{mode:9s} {policy:12s} {o['balancedness']:8.3f} {o['maxvio']:7.2f} "
          f"{100 * o['drop_rate']:6.2f} {report_lib.fmt(o['hit_rate'], 5, 2)} "
          f"{report_lib.fmt(o['load_l1_error'], 6, 2)} {o['replica_bytes_per_step'] / 1e6:8.3f} "
          f"{o['step_ms']:7.1f} {o['tokens_per_second']:7.0f} {o['same_tokens_as_none']:8.3f} "
          f"{o['modelled_ep_speedup_vs_none']:10.2f}")
  return "\n".join(rows)


def phase_tables(report: dict) -> str:
  """A decoder report's text: the prefill table, the decode table and the dropless check."""
  meta, decode = report["meta"], report["meta"]["decode"]
  return "\n".join([
      f"prefill (the prompt pass, {meta['batches']} batches of {decode['batch']} x "
      f"{decode['prompt']} tokens; MB moved: summed over batches; tok/s: prompt tokens/s)",
      report_lib.table(report), "",
      f"decode ({decode['steps']} greedy steps with the KV cache after each prompt, "
      f"{decode['batch']} new tokens per step; MB/step: per step, all MoE layers; ms/step, "
      "tok/s: the decode steps alone)",
      table(report["decode"])] + _capacity_note(report["decode"]) + ["", invariant(report)])


def _capacity_note(decode: dict) -> list[str]:
  """Why capacity-mode decode tokens may differ from none's (oracle's loads then approximate)."""
  differ = [p for p, r in decode.get("capacity", {}).items()
            if r["overall"]["same_tokens_as_none"] < 1.0]
  if not differ:
    return []
  return [f"capacity: {', '.join(differ)} emitted other tokens than none (same tok < 1): replicas "
          "change which choices the prompt pass drops, so the cached keys and values differ; "
          "oracle replays none's loads, approximate once the tokens differ."]


def invariant(report: dict) -> str:
  """One line: dropless prefill logits within 1e-6 (relative) of none's and dropless decode tokens
  identical to none's, for every policy; the offenders named when not."""
  prefill = report["modes"].get("dropless")
  decode = report.get("decode", {}).get("dropless")
  if prefill is None or decode is None:
    return "dropless invariant: not checked (no dropless mode in --config.bench.capacity_modes)"
  diffs = {p: r["overall"]["output_rel_diff_vs_none"] for p, r in prefill.items()
           if r["overall"].get("exact", True)}     # the approximate mode is not held to it
  same = {p: r["overall"]["same_tokens_as_none"] for p, r in decode.items()}
  bad_logits = [f"{p} {d:.1e}" for p, d in diffs.items() if not d <= 1e-6]
  bad_tokens = [f"{p} {s:.3f}" for p, s in same.items() if s != 1.0]
  logits = "<= 1e-6: ok" if not bad_logits else "EXCEEDS 1e-6: " + ", ".join(bad_logits)
  tokens = "ok, every policy" if not bad_tokens else "NO: " + ", ".join(bad_tokens)
  return (f"dropless invariant: prefill logits max reldiff vs none {max(diffs.values()):.1e} "
          f"({logits}); decode tokens identical to none's: {tokens}")
