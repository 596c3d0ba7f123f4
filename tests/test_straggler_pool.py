"""benchmarks/straggler_pool.py: pooled paired ratios, ideal from the loads, interval, errors."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "straggler_pool.py")
_spec = importlib.util.spec_from_file_location("straggler_pool", SCRIPT)
straggler_pool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(straggler_pool)


def _run(tmp_path, name, none_s, policy_s, none_peak, policy_peak, rounds=2):
  """A straggler result on disk: 1 layer, 2 devices; the max device load per step is given."""
  loads = lambda peak: np.array([[[[peak], [peak // 2]]] for _ in none_s], np.int32)  # [N,1,2,1]
  np.savez(tmp_path / f"{name}_runs.npz", **{
      "none/seconds": np.array(none_s), "history/seconds": np.array(policy_s),
      "none/tokens_per_device": loads(none_peak), "history/tokens_per_device": loads(policy_peak)})
  report = {"flags": {"policies": ["none", "history"], "d_ff": 2048, "rounds": rounds},
            "runs_file": f"{name}_runs.npz"}
  path = tmp_path / f"{name}.json"
  path.write_text(json.dumps(report))
  return str(path)


def test_pool_takes_the_median_of_all_paired_ratios_and_the_ideal_of_all_loads(tmp_path):
  a = _run(tmp_path, "a", [1.0, 1.2, 0.9], [0.8, 1.0, 0.9], 1300, 1000)
  b = _run(tmp_path, "b", [1.1, 1.4], [1.0, 1.0], 1300, 1000, rounds=5)   # rounds may differ
  row = straggler_pool.pool([straggler_pool.load(a), straggler_pool.load(b)], resamples=500)
  row = row["history"]
  ratios = [1.0 / 0.8, 1.2 / 1.0, 0.9 / 0.9, 1.1 / 1.0, 1.4 / 1.0]
  assert row["pairs"] == 5
  assert row["speedup"] == pytest.approx(np.median(ratios))
  assert row["ideal"] == pytest.approx(1.3)
  assert row["fraction_of_ideal"] == pytest.approx(np.median(ratios) / 1.3)
  assert min(ratios) <= row["speedup_lo"] <= row["speedup"] <= row["speedup_hi"] <= max(ratios)


def test_pool_refuses_runs_of_different_commands(tmp_path):
  a = _run(tmp_path, "a", [1.0], [0.9], 1300, 1000)
  b = _run(tmp_path, "b", [1.0], [0.9], 1300, 1000)
  report = json.loads(open(b).read())
  report["flags"]["d_ff"] = 3072
  open(b, "w").write(json.dumps(report))
  with pytest.raises(ValueError, match=r"\['d_ff'\].*only --rounds"):
    straggler_pool.pool([straggler_pool.load(a), straggler_pool.load(b)])
  os.remove(tmp_path / "a_runs.npz")
  with pytest.raises(FileNotFoundError, match="beside its .json"):
    straggler_pool.load(a)


def test_pool_cli_on_the_shipped_results():
  """Three committed runs of `python benchmarks/straggler.py` pool end to end."""
  paths = [os.path.join(ROOT, "benchmarks", "results", f"straggler_20261129-{stamp}.json")
           for stamp in ("080123", "081142", "081627")]
  proc = subprocess.run([sys.executable, SCRIPT, "--resamples=200"] + paths, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert [line.split()[0] for line in lines[2:]] == ["history", "pregate", "learned", "oracle"]
  assert all(line.split()[1] == "60" for line in lines[2:])     # 3 runs x 5 rounds x 4 batches


def test_pool_reads_a_run_without_phase_as_prefill(tmp_path):
  old = _run(tmp_path, "old", [1.0], [0.9], 1300, 1000)
  new = _run(tmp_path, "new", [1.0], [0.8], 1300, 1000)
  decode = _run(tmp_path, "decode", [1.0], [0.8], 1300, 1000)
  for name, phase in (("new", "prefill"), ("decode", "decode")):
    report = json.loads((tmp_path / f"{name}.json").read_text())
    report["flags"]["phase"] = phase
    (tmp_path / f"{name}.json").write_text(json.dumps(report))
  row = straggler_pool.pool([straggler_pool.load(old), straggler_pool.load(new)], resamples=50)
  assert row["history"]["pairs"] == 2
  with pytest.raises(ValueError, match=r"\['phase'\]"):
    straggler_pool.pool([straggler_pool.load(old), straggler_pool.load(decode)])
