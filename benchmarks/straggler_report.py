"""benchmarks/straggler.py's summary: per policy, step times and speedups over `none` next to
the ideal speedups from the measured loads, and the printed table."""

import numpy as np


def summarise(runs: dict, flops_per_s: float, flags: dict) -> dict:
  """Per policy: step times and speedups over none next to the ideal speedup from the loads.

  `runs`: policy -> per-step records (seconds, tokens_per_device, fetched_bytes); `flags`: the
  run's flags (`straggler._flag_dict`).

  Two ideals: `ideal_speedup` = the balance-implied one the issue names (max device load under
  none / under the policy: what a step made only of expert FFNs would gain), and
  `amdahl_ideal_speedup`, which removes only the straggler's expert-FFN time that balance saves
  (per-token FFN FLOPs / the fitted `flops_per_s`) from the measured none step: the rest of the
  step (routing, all-to-alls, dense sublayers) does not shrink with balance.

  On a shared machine, background load drifts over minutes; three speedup estimates are kept:
  `speedup` = median over (round, batch) of t_none / t_policy of the runs interleaved in the same
  step (paired: both saw about the same background load), `median_speedup` = ratio of the medians,
  `min_speedup` = ratio of the fastest (least-disturbed) runs.
  """
  peak = {p: sum(float(np.max(r["tokens_per_device"], axis=(1, 2)).sum()) for r in rs)
          for p, rs in runs.items()}
  times = {p: np.array([r["seconds"] for r in rs]) for p, rs in runs.items()}
  rows = {}
  ffn_seconds = lambda tokens: tokens * 4 * flags["d_model"] * flags["d_ff"] / flops_per_s
  t_none = float(np.median(times["none"]))
  for p, rs in runs.items():
    ideal = peak["none"] / peak[p]
    saved = ffn_seconds((peak["none"] - peak[p]) / len(rs))          # per step
    per_layer = np.stack([r["tokens_per_device"] for r in rs])              # [N, L, Dd, De]
    rows[p] = dict(
        median_s=float(np.median(times[p])), min_s=float(times[p].min()),
        p25_s=float(np.percentile(times[p], 25)), p75_s=float(np.percentile(times[p], 75)),
        runs=len(rs), ideal_speedup=ideal,
        speedup=float(np.median(times["none"] / times[p])),
        median_speedup=float(np.median(times["none"]) / np.median(times[p])),
        min_speedup=float(times["none"].min() / times[p].min()),
        balancedness=float(np.mean(per_layer.mean(axis=(2, 3)) / per_layer.max(axis=(2, 3)))),
        fetched_mb_per_step=float(np.mean([np.sum(r["fetched_bytes"]) for r in rs]) / 1e6))
    rows[p]["fraction_of_ideal"] = rows[p]["speedup"] / ideal
    rows[p]["amdahl_ideal_speedup"] = t_none / (t_none - saved)
    rows[p]["fraction_of_amdahl_ideal"] = rows[p]["speedup"] / rows[p]["amdahl_ideal_speedup"]
  return rows


def print_table(rows: dict, cluster: dict, flags: dict) -> None:
  """The table of `summarise`'s rows and the fitted cluster."""
  f = flags
  print(f"\nstraggler ({f['phase']}): 2 processes x 1 pinned core, mesh data=1 x expert=2; "
        f"d={f['d_model']} f={f['d_ff']} E={f['num_experts']} top-1, {f['num_layers']} MoE "
        f"layers, {f['batch'] * f['length']} tokens/step, r={f['replica_slots']}, "
        f"resident={f['resident']} stickiness={f['stickiness']}, "
        f"{'one dynamic program' if f['dynamic'] else 'one program per policy'}; "
        f"{f['rounds']} rounds x {f['steps']} batches per policy, interleaved. Shared machine: "
        "speedup = median of paired ratios (same step), also ratio of medians and of minima")
  print(f"{'policy':9s} {'median ms':>10s} {'p25-p75 ms':>15s} {'min ms':>8s} {'balanced':>9s} "
        f"{'ideal':>6s} {'speedup':>8s} {'of ideal':>9s} {'med/med':>8s} {'min/min':>8s} "
        f"{'MB/step':>8s} {'amdahl':>7s} {'of it':>7s}")
  for p, r in rows.items():
    print(f"{p:9s} {r['median_s'] * 1e3:10.1f} {r['p25_s'] * 1e3:7.1f}-{r['p75_s'] * 1e3:<7.1f} "
          f"{r['min_s'] * 1e3:8.1f} {r['balancedness']:9.3f} {r['ideal_speedup']:6.3f} "
          f"{r['speedup']:8.3f} {r['fraction_of_ideal'] * 100:8.1f}% {r['median_speedup']:8.3f} "
          f"{r['min_speedup']:8.3f} {r['fetched_mb_per_step']:8.1f} "
          f"{r['amdahl_ideal_speedup']:7.3f} {r['fraction_of_amdahl_ideal'] * 100:6.1f}%")
  print(f"fitted (median over rounds): {cluster['flops_per_s'] / 1e9:.1f} GFLOP/s per core, memory "
        f"{cluster['hbm_bytes_per_s'] / 1e9:.1f} GB/s, all-to-all "
        f"{cluster['a2a_bytes_per_s'] / 1e9:.2f} GB/s + {cluster['latency_s'] * 1e3:.2f} ms")
  print(f"fixed cost per MoE layer beyond the modelled phases: "
        f"{cluster['layer_overhead_s'] * 1e3:.2f} ms")
  if "decode_bytes_per_s" in cluster:
    print(f"decode: weight reads {cluster['decode_bytes_per_s'] / 1e9:.1f} GB/s, per-row "
          f"{cluster['decode_flops_per_s'] / 1e9:.1f} GFLOP/s")
