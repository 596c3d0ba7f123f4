"""PNG plots of a benchmark report (matplotlib, headless).

Each plot names what it shows: the capacity mode, whether a number is a per-layer mean or pooled
over layers, and (throughput) that simulated devices share the host's cores.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def write_all(report: dict, out_dir: str) -> list[str]:
  """Writes every plot for the first dispatch mode (dropless if present); returns the paths.

  A decoder-only family's report has two phases: the prefill plots keep their names (titles
  say "prefill"), the decode phase adds decode_expert_load_heatmap.png, decode_device_load.png
  and decode_bytes_per_step.png.
  """
  mode = "dropless" if "dropless" in report["modes"] else next(iter(report["modes"]))
  policies = report["modes"][mode]
  phase = "prefill" if "decode" in report else ""
  paths = [
      expert_load_heatmap(policies["none"], os.path.join(out_dir, "expert_load_heatmap.png"),
                          phase=phase),
      device_load(policies, os.path.join(out_dir, "device_load.png"), mode=mode, phase=phase),
      hit_rate(policies, os.path.join(out_dir, "predictor_hit_rate.png"), mode=mode),
      throughput(report, os.path.join(out_dir, "throughput.png")),
  ]
  if "decode" in report:
    decode = report["decode"].get(mode) or next(iter(report["decode"].values()))
    join = lambda name: os.path.join(out_dir, f"decode_{name}.png")
    paths += [expert_load_heatmap(decode["none"], join("expert_load_heatmap"), phase="decode"),
              device_load(decode, join("device_load"), mode=mode, phase="decode"),
              bytes_per_step(decode, join("bytes_per_step"), mode=mode)]
  return paths


def _phase(phase: str) -> str:
  return {"prefill": "prefill (prompt pass): ", "decode": "decode steps: "}.get(phase, "")


def expert_load_heatmap(none: dict, path: str, *, phase: str = "") -> str:
  layers = list(none["layers"])
  loads = np.array([none["layers"][k]["tokens_per_expert"] for k in layers], np.float64)
  loads = loads / loads.sum(axis=1, keepdims=True).clip(1)
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(layers) + 1.5))
  im = ax.imshow(loads, aspect="auto", cmap="viridis")
  ax.set_yticks(range(len(layers)), layers)
  ax.set_xlabel("expert")
  ax.set_title(f"{_phase(phase)}share of token-choices per expert (policy none)")
  fig.colorbar(im, ax=ax, label="share of the layer's tokens")
  return _save(fig, path)


def device_load(policies: dict, path: str, *, mode: str = "", phase: str = "") -> str:
  """Per policy, tokens per device pooled over all MoE layers and batches (/ their mean), over
  the grey bars of `none`. Titles give both balancedness figures: the per-layer mean (the
  report's) and that of the pooled bars shown (pooling hides per-layer imbalance)."""
  names = [p for p in policies if p != "none"]
  none = _device_totals(policies["none"])
  fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), sharey=True,
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    own = _device_totals(policies[name])
    x = np.arange(len(own))
    ax.bar(x, none / none.mean(), color="lightgrey", label="none")
    ax.bar(x, own / own.mean(), width=0.5, color="tab:blue", label=name)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_title(f"{name}\nbalancedness: per-layer mean "
                 f"{policies[name]['overall']['balancedness']:.2f},\npooled (bars) "
                 f"{own.mean() / own.max():.2f} (none: {none.mean() / none.max():.2f})",
                 fontsize=8)
    ax.set_xlabel("device")
    ax.set_ylim(0, 1.3 * max((none / none.mean()).max(), (own / own.mean()).max()))
    ax.legend(fontsize=7, loc="upper center", ncol=2)
  pooled = "MoE layers, steps, batches" if phase == "decode" else "MoE layers, batches"
  axes[0][0].set_ylabel(f"tokens / mean\n(pooled over {pooled})")
  fig.suptitle(f"{_phase(phase)}tokens per device, capacity mode {mode or '?'}: each policy vs "
               "none", fontsize=10)
  return _save(fig, path)


def hit_rate(policies: dict, path: str, *, mode: str = "") -> str:
  """Top-1 hit rate of the one-layer-ahead prediction per MoE layer. The first MoE layer of each
  stack has none: no earlier MoE layer of its stack predicts it (its replicas follow the history
  EMA), so it is marked n/a rather than left out."""
  fig, ax = plt.subplots(figsize=(7.5, 3.6))
  layers, missing = [], []
  for name in ("pregate", "learned"):
    if name not in policies:
      continue
    per_layer = policies[name]["layers"]
    layers = list(per_layer)
    values = [np.nan if v["hit_rate"] is None else float(v["hit_rate"])
              for v in per_layer.values()]
    missing = [k for k, v in zip(layers, values) if np.isnan(v)]
    ax.plot(range(len(layers)), values, "o-", label=name)
  for k in missing:
    ax.annotate("n/a", (layers.index(k), 0.04), ha="center", fontsize=8, color="grey")
  ax.set_xticks(range(len(layers)), layers)
  ax.set_xlim(-0.5, len(layers) - 0.5)
  ax.set_ylim(0, 1)
  ax.set_xlabel("MoE layer (stack/index)")
  ax.set_ylabel("top-1 hit rate")
  ax.set_title(f"one-layer-ahead predictor hit rate per MoE layer (capacity mode {mode or '?'})",
               fontsize=10)
  if missing:
    fig.text(0.01, 0.01, f"n/a: {', '.join(missing)} - the first MoE layer of each stack has no "
             "earlier MoE layer to predict it from;\nits replicas follow the history EMA "
             "instead, so it has no per-token prediction.", fontsize=7, color="dimgrey")
  ax.legend(loc="upper left")
  ax.tick_params(axis="x", rotation=30)
  fig.tight_layout(rect=(0, 0.08 if missing else 0, 1, 1))
  return _save(fig, path, layout=False)


def throughput(report: dict, path: str) -> str:
  """Tokens/s per policy and mode on this host, with the caveat that simulated devices share its
  cores (so this is replication's overhead, not the straggler effect)."""
  fig, ax = plt.subplots(figsize=(7.5, 3.6))
  modes = list(report["modes"])
  names = list(report["modes"][modes[0]])
  width = 0.8 / len(modes)
  for i, mode in enumerate(modes):
    values = [report["modes"][mode][n]["overall"]["tokens_per_second"] for n in names]
    ax.bar(np.arange(len(names)) + i * width, values, width, label=mode)
  ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
  ax.set_ylabel("tokens / s (this host)")
  meta = report.get("meta", {})
  devices, platform = meta.get("num_devices"), meta.get("platform", "")
  title = "throughput per policy"
  if platform == "cpu":
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    title += f" ({devices} simulated devices sharing {cores} CPU core(s))"
    fig.text(0.01, 0.01, f"caveat: the {devices} simulated CPU devices share this host's {cores} "
             "core(s), so the bars measure what replication costs in\ncompute, not the straggler "
             "it removes; for that see the EP speedup column (a step-time model) and\n"
             "benchmarks/straggler.py (real processes).", fontsize=7, color="dimgrey")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout(rect=(0, 0.12 if platform == "cpu" else 0, 1, 1))
  return _save(fig, path, layout=False)


def bytes_per_step(policies: dict, path: str, *, mode: str = "") -> str:
  """Expert-weight MB copied into replica slots in each decode step (all MoE layers, mean over
  batches), one line per replicating policy; the legend gives each one's mean per step."""
  fig, ax = plt.subplots(figsize=(7.5, 3.6))
  for name, policy in policies.items():
    if name == "none":
      continue
    series = np.asarray(policy["overall"]["replica_bytes_per_step_series"], np.float64) / 1e6
    ax.plot(np.arange(1, len(series) + 1), series, "o-", ms=3,
            label=f"{name} (mean {series.mean():.3f} MB/step)")
  ax.set_xlabel("decode step")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_ylabel("MB moved into replica slots\n(all MoE layers, mean over batches)")
  ax.set_ylim(bottom=0)
  ax.set_title(f"decode steps: replica bytes moved per step (capacity mode {mode or '?'})",
               fontsize=10)
  ax.legend(fontsize=8)
  return _save(fig, path)


def _device_totals(policy: dict) -> np.ndarray:
  return np.sum([np.asarray(v["tokens_per_device"], np.float64)
                 for v in policy["layers"].values()], axis=0)


def _save(fig, path: str, *, layout: bool = True) -> str:
  if layout:
    fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
