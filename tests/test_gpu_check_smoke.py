"""benchmarks/gpu_check.py runs end to end with tiny shapes on CPU and writes its result file."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def test_gpu_check_smoke_writes_result(tmp_path):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a one-GPU machine
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", f"--out_dir={tmp_path}"], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  files = glob.glob(os.path.join(tmp_path, "gpu_check_*.json"))
  assert len(files) == 1, (files, proc.stdout[-2000:])
  with open(files[0]) as f:
    result = json.load(f)
  assert result["smoke"] is True and result["command"]
  assert result["grouped_matmul"]["rows"] and "error" not in result["grouped_matmul"]
  assert "error" not in result["replication"]
  assert 0 < result["replication"]["fraction_of_layer"]
  model = result["model"]
  assert "error" not in model and model["rows"][0]["moe_jax_tok_s"] > 0
  if "hf_tok_s" in model["rows"][0]:   # torch + transformers present: float32 outputs agree
    row = model["rows"][0]
    assert row["encoder_max_abs_diff"] <= 1e-4 * max(row["encoder_max_abs"], 1.0)
