"""benchmarks/gpu_check.py runs end to end with tiny shapes on CPU and writes its result file."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
CACHE = os.environ.get("MOE_JAX_TEST_CACHE",
                       os.path.expanduser("~/.cache/moe_jax/test_compilation_cache"))


def _run(tmp_path, devices, *flags):
  """The script's result dict, run in a fresh process on `devices` CPU devices (with the tests'
  persistent compilation cache, so a warm run loads its programs instead of compiling them)."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", f"--out_dir={tmp_path}", *flags],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  files = glob.glob(os.path.join(tmp_path, "gpu_check_*.json"))
  assert len(files) == 1, (files, proc.stdout[-2000:])
  with open(files[0]) as f:
    return json.load(f)


def _check_decoder(decoder):
  assert "error" not in decoder, decoder.get("traceback")
  assert decoder["ok"] and decoder["tokens_identical"] and decoder["logits_rel_diff"] <= 1e-6
  assert decoder["routing_mismatches"] == 0
  for name in ("home_only", "replicas"):
    assert decoder[name]["prefill_tok_s"] > 0 and decoder[name]["decode_step_ms"] >= 0


def test_gpu_check_smoke_writes_result(tmp_path):
  result = _run(tmp_path, 1)          # one CPU device, as on a one-GPU machine
  assert result["smoke"] is True and result["command"]
  assert result["grouped_matmul"]["rows"] and "error" not in result["grouped_matmul"]
  assert "error" not in result["replication"]
  assert 0 < result["replication"]["fraction_of_layer"]
  model = result["model"]
  assert "error" not in model and model["rows"][0]["moe_jax_tok_s"] > 0
  if "hf_tok_s" in model["rows"][0]:   # torch + transformers present: float32 outputs agree
    row = model["rows"][0]
    assert row["encoder_max_abs_diff"] <= 1e-4 * max(row["encoder_max_abs"], 1.0)
  decoder = result["decoder"]
  _check_decoder(decoder)
  assert decoder["mesh"] == {"data": 1, "expert": 1}
  assert (decoder["gmm_backend"], decoder["all_to_all"]) == ("windowed", "padded")   # CPU 'auto'


def test_gpu_check_decoder_replicas_on_an_expert_mesh(tmp_path):
  """Part (d) on 8 CPU devices: replicas are placed, compute tokens in the prefill and in the
  decode steps, and change nothing."""
  decoder = _run(tmp_path, 8, "--parts=d")["decoder"]
  _check_decoder(decoder)
  assert decoder["mesh"] == {"data": 1, "expert": 8}
  assert decoder["replicas_placed"] > 0 and decoder["replica_rows"] > 0
  assert decoder["generate_replica_rows"] > decoder["replica_rows"]   # decode steps used them too
