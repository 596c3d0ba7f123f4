"""PNG plots of a benchmark report (matplotlib, headless)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402


def write_all(report: dict, out_dir: str) -> list[str]:
  """Writes every plot for the first dispatch mode (dropless if present); returns the paths."""
  mode = "dropless" if "dropless" in report["modes"] else next(iter(report["modes"]))
  policies = report["modes"][mode]
  paths = [
      expert_load_heatmap(policies["none"], os.path.join(out_dir, "expert_load_heatmap.png")),
      device_load(policies, os.path.join(out_dir, "device_load.png")),
      hit_rate(policies, os.path.join(out_dir, "predictor_hit_rate.png")),
      throughput(report, os.path.join(out_dir, "throughput.png")),
  ]
  return paths


def expert_load_heatmap(none: dict, path: str) -> str:
  layers = list(none["layers"])
  loads = np.array([none["layers"][k]["tokens_per_expert"] for k in layers], np.float64)
  loads = loads / loads.sum(axis=1, keepdims=True).clip(1)
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(layers) + 1.5))
  im = ax.imshow(loads, aspect="auto", cmap="viridis")
  ax.set_yticks(range(len(layers)), layers)
  ax.set_xlabel("expert")
  ax.set_title("share of token-choices per expert (policy none)")
  fig.colorbar(im, ax=ax, label="share of the layer's tokens")
  return _save(fig, path)


def device_load(policies: dict, path: str) -> str:
  names = [p for p in policies if p != "none"]
  none = _device_totals(policies["none"])
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True, squeeze=False)
  for ax, name in zip(axes[0], names):
    own = _device_totals(policies[name])
    x = np.arange(len(own))
    ax.bar(x, none / none.mean(), color="lightgrey", label="none")
    ax.bar(x, own / own.mean(), width=0.5, color="tab:blue", label=name)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_title(f"{name}: balancedness {policies[name]['overall']['balancedness']:.2f}")
    ax.set_xlabel("device")
  axes[0][0].set_ylabel("tokens / mean (all MoE layers)")
  axes[0][0].legend(fontsize=7)
  return _save(fig, path)


def hit_rate(policies: dict, path: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 3))
  for name in ("pregate", "learned"):
    if name not in policies:
      continue
    layers = [k for k, v in policies[name]["layers"].items() if v["hit_rate"] is not None
              and not np.isnan(v["hit_rate"])]
    ax.plot(layers, [policies[name]["layers"][k]["hit_rate"] for k in layers], "o-", label=name)
  ax.set_ylim(0, 1)
  ax.set_ylabel("top-1 hit rate")
  ax.set_title("one-layer-ahead predictor hit rate per MoE layer")
  ax.legend()
  ax.tick_params(axis="x", rotation=30)
  return _save(fig, path)


def throughput(report: dict, path: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 3))
  modes = list(report["modes"])
  names = list(report["modes"][modes[0]])
  width = 0.8 / len(modes)
  for i, mode in enumerate(modes):
    values = [report["modes"][mode][n]["overall"]["tokens_per_second"] for n in names]
    ax.bar(np.arange(len(names)) + i * width, values, width, label=mode)
  ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
  ax.set_ylabel("tokens / s (this host)")
  ax.set_title("throughput per policy")
  ax.legend()
  return _save(fig, path)


def _device_totals(policy: dict) -> np.ndarray:
  return np.sum([np.asarray(v["tokens_per_device"], np.float64)
                 for v in policy["layers"].values()], axis=0)


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
