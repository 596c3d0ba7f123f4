"""Step time vs device count, one panel per shape, one line per policy (matplotlib, Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

STYLES = {"none": ("k", "o"), "history": ("tab:orange", "s"), "pregate": ("tab:blue", "^"),
          "learned": ("tab:green", "v"), "oracle": ("tab:red", "x")}


def step_time_vs_devices(results: dict, path: str, *, title: str = "") -> None:
  """results: shape name -> device count -> policy -> `PolicyResult`; writes a PNG to `path`.

  Top row: mean modelled step time (ms); bottom row: speedup over `none`.
  """
  shapes = list(results)
  fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 7.5), squeeze=False)
  for col, shape in enumerate(shapes):
    devices = sorted(results[shape])
    policies = list(results[shape][devices[0]])
    for policy in policies:
      color, marker = STYLES.get(policy, ("gray", "."))
      times = [results[shape][n][policy].mean_step_s * 1e3 for n in devices]
      speedups = [results[shape][n][policy].speedup for n in devices]
      axes[0, col].plot(devices, times, color=color, marker=marker, label=policy)
      axes[1, col].plot(devices, speedups, color=color, marker=marker, label=policy)
    axes[0, col].set_title(shape, fontsize=10)
    for row, label in ((0, "step time, all MoE layers (ms)"), (1, "speedup over none")):
      axes[row, col].set_xscale("log", base=2)
      axes[row, col].set_xlabel("devices")
      axes[row, col].set_ylabel(label)
      axes[row, col].grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
