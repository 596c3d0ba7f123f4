"""Smoke runs of every launch script on a micro model, as a user would run them (subprocesses).

One module-scoped fixture trains a micro Switch model for a few steps with launch/train.py; the
other scripts then use its checkpoint. The subprocesses share the persistent compilation cache.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = [
    "--config.model.vocab_size=256", "--config.train.vocab_size=256", "--config.model.d_model=16",
    "--config.model.d_ff=32", "--config.model.d_kv=8", "--config.model.num_heads=2",
    "--config.model.num_layers=2", "--config.model.num_decoder_layers=2",
    "--config.model.num_sparse_encoder_layers=2", "--config.model.num_sparse_decoder_layers=2",
    "--config.model.encoder_sparse_step=1", "--config.model.decoder_sparse_step=1",
    "--config.model.num_experts=8", "--config.data.encoder_len=16", "--config.data.decoder_len=16",
]


def _run(script, *args, check=True, timeout=300, extra_env=None):
  env = dict(os.environ, **(extra_env or {}))
  env.pop("XLA_FLAGS", None)           # each script chooses its own device count
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.path.expanduser("~/.cache/moe_jax/test_compilation_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")   # this checkout's moe_jax
  proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("micro"))
  _run("train.py", *MICRO, "--config.train.steps=3", "--config.train.batch_size=4",
       "--config.train.log_every=1", "--config.train.warmup=1", f"--config.train.out_dir={out}")
  return out


def test_train_wrote_a_loadable_checkpoint(checkpoint):
  assert os.path.exists(os.path.join(checkpoint, "spiece.model"))
  with open(os.path.join(checkpoint, "moe_jax.json")) as f:
    manifest = json.load(f)
  assert manifest["config"]["num_experts"] == 8
  assert len(manifest["metadata"]["history"]) == 3
  assert set(manifest["metadata"]["skew"]) == {"encoder/0", "encoder/1", "decoder/0", "decoder/1"}


def test_predictor_bench_and_infer(checkpoint, tmp_path):
  predictor = os.path.join(checkpoint, "predictor")
  _run("train_predictor.py", f"--config.checkpoint={checkpoint}", f"--out_dir={predictor}",
       "--config.train.predictor_steps=3", "--config.train.predictor_batches=1",
       "--config.data.batch_size=4", "--config.data.encoder_len=16", "--config.data.decoder_len=16")
  report_dir = str(tmp_path / "report")
  proc = _run("bench.py", f"--config.checkpoint={checkpoint}",
              f"--config.predictor_checkpoint={predictor}", "--config.data.batch_size=8",
              "--config.data.num_batches=1", "--config.bench.repeats=1",
              "--config.data.encoder_len=16", "--config.data.decoder_len=16",
              "--config.bench.capacity_modes=dropless", f"--config.bench.report_dir={report_dir}")
  assert "EP speedup" in proc.stdout
  with open(os.path.join(report_dir, "report.json")) as f:
    report = json.load(f)
  assert set(report["modes"]) == {"dropless"}
  assert set(report["modes"]["dropless"]) == {"none", "history", "pregate", "learned", "oracle"}
  for policy, r in report["modes"]["dropless"].items():
    assert r["overall"]["output_rel_diff_vs_none"] <= 1e-6, policy
  for name in ("expert_load_heatmap", "device_load", "predictor_hit_rate", "throughput"):
    assert os.path.getsize(os.path.join(report_dir, f"{name}.png")) > 1000
  proc = _run("infer.py", f"--config.checkpoint={checkpoint}", "--text=The assert statement",
              "--max_new_tokens=3")
  assert "[0] ids:" in proc.stdout and "balancedness" in proc.stdout


def test_infer_on_two_processes_matches_one_process(checkpoint):
  """launch/infer.py as one job of 2 processes x 4 CPU devices (launch/local_cluster.py): the same
  continuation and per-layer balance lines as one process with 8 devices."""
  args = [f"--config.checkpoint={checkpoint}", "--text=The assert statement",
          "--max_new_tokens=3"]
  single = _run("infer.py", *args).stdout.splitlines()
  env = {"JAX_COMPILATION_CACHE_DIR": os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/moe_jax/test_compilation_cache"))
      + "-2proc"}
  proc = _run("local_cluster.py", "--num_processes=2", "--devices_per_process=4",
              "--platform=cpu", "--timeout_s=240", "--", sys.executable,
              os.path.join(REPO, "launch", "infer.py"), *args, "--config.cpu_devices=4",
              extra_env=env)
  leader = [line[len("[0] "):] for line in proc.stdout.splitlines() if line.startswith("[0] ")]
  follower = [line for line in proc.stdout.splitlines() if line.startswith(("[1] [0] ids", "[1]   "))]
  wanted = [line for line in single if line.startswith(("[0] ids", "  none", "  pregate"))]
  assert len(wanted) >= 3
  assert [line for line in leader if line in wanted] == wanted, proc.stdout
  assert not follower, "only process 0 prints results"
  assert "(mesh data=1 x expert=8" in proc.stdout


def test_single_process_scripts_refuse_a_multi_process_job():
  proc = _run("train.py", "--coordinator=localhost:1", "--num_processes=2", "--process_id=0",
              check=False)
  assert proc.returncode == 2
  assert "train.py runs as one process" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_layer():
  proc = _run("demo_layer.py", "--num_experts=8")
  assert "max |moe_apply - dense oracle| = 0.00e+00" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--config.replication.replica_slotz=2"], 'Did you mean "num_replica_slots"'),
    (["--config.execution.capacity_mode=sometimes"],
     "--config.execution: ExecutionConfig.capacity_mode='sometimes' is not one of"),
    (["--config.replication.num_replica_slots=-1"], "--config.replication: num_replica_slots=-1"),
    (["--config.checkpoint=/nonexistent"], "is not a directory"),
    (["--config.mesh.data=16", "--config.checkpoint=."], "does not fit the 8 visible"),
])
def test_bad_input_is_one_line(args, message):
  proc = _run("infer.py", *args, "--text=x", check=False)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr


def test_simulate_refuses_stickiness_without_resident_replicas():
  proc = _run("simulate.py", "--stickiness=0.1", check=False)
  assert proc.returncode == 2 and "add --resident_replicas" in proc.stderr
  assert "Traceback" not in proc.stderr
