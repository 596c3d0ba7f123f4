"""Result files and interleaved timing shared by the benchmark scripts.

  path = write_result("peer_switch", {"results": rows})   # results/<name>_<date>_<machine>.json
  medians = interleaved_medians({"a": run_a, "b": run_b}, rounds=5)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import sys
import time

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --- machine and result files ---


def machine_name() -> str:
  """A short, file-name-safe machine tag: host name and accelerator or CPU core count."""
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  kind = device.device_kind.replace(" ", "-") if device.platform != "cpu" else (
      f"cpu{os.cpu_count()}")
  host = socket.gethostname().split(".")[0]
  return "".join(c if c.isalnum() or c in "-_" else "-" for c in f"{host}_{kind}")


def machine_info() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  info = {"host": socket.gethostname(), "platform": platform.platform(),
          "processor": _cpu_model(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
          "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()][:8]}
  for module in ("torch", "transformers"):
    try:
      info[module] = __import__(module).__version__
    except ImportError:
      info[module] = None
  return info


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def write_result(name: str, payload: dict, out_dir: str = RESULTS_DIR) -> str:
  """Writes `payload` (plus date, machine, command) to out_dir/<name>_<date>_<machine>.json."""
  os.makedirs(out_dir, exist_ok=True)
  now = datetime.datetime.now()
  record = {"date": now.isoformat(timespec="seconds"), "machine": machine_info(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), **payload}
  path = os.path.join(out_dir, f"{name}_{now:%Y%m%d-%H%M%S}_{machine_name()}.json")
  with open(path, "w") as f:
    json.dump(record, f, indent=1, default=_json_default)
  return path


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value)}")


# --- timing ---


def interleaved_times(contenders: dict, rounds: int) -> dict:
  """{name: fn()} -> {name: [seconds per round]}; each fn runs once first (compile, warm-up),
  then the rounds interleave the contenders."""
  for fn in contenders.values():
    fn()
  times = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def interleaved_medians(contenders: dict, rounds: int) -> dict:
  """{name: fn()} -> {name: median seconds} of `interleaved_times`."""
  return {name: float(np.median(ts))
          for name, ts in interleaved_times(contenders, rounds).items()}
