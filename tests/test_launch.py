"""Smoke runs of every launch script on a micro model, as a user would run them (subprocesses),
their one-line errors, the compilation-cache setting, and what bench.py's plots say.

One module-scoped fixture trains a micro Switch model for a few steps with launch/train.py; the
other scripts then use its checkpoint. The subprocesses share the persistent compilation cache.
"""

import json
import os
import subprocess
import sys

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
              f"--config.predictor_checkpoint={predictor}", "--config.seed_predictor_checkpoint=",
              "--config.data.batch_size=8",
              "--config.data.num_batches=1", "--config.bench.repeats=1",
              "--config.data.encoder_len=16", "--config.data.decoder_len=16",
              "--config.bench.capacity_modes=dropless", f"--config.bench.report_dir={report_dir}")
  assert "EP speedup" in proc.stdout
  with open(os.path.join(report_dir, "report.json")) as f:
    report = json.load(f)
  assert set(report["modes"]) == {"dropless"}
  assert set(report["modes"]["dropless"]) == {"none", "history", "pregate", "learned",
                                               "learned_load", "eplb", "reactive", "oracle"}
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
  follower = [line for line in proc.stdout.splitlines()
              if line.startswith(("[1] [0] ids", "[1]   "))]
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


@pytest.mark.parametrize("script,args,message", [
    ("infer.py", ["--config.replication.replica_slotz=2"],
     "did you mean --config.replication.num_replica_slots?"),
    ("infer.py", ["--config.nonexistent=1"],
     "--config.nonexistent is not a config key; the keys of --config are: bench, checkpoint,"),
    ("bench.py", ["--config=configs/bench.py", "--config.bench.polices=none"],   # parsed later
     "did you mean --config.bench.policies?"),
    ("bench.py", ["--config=configs/bench.py:modle=x"],     # the config file's own ValueError
     "flag --config=configs/bench.py:modle=x: ValueError: configs/bench.py: unknown options"),
    ("infer.py", ["--config.seed=abc"], "flag --config.seed=abc:"),
    ("infer.py", ["--config.execution.capacity_mode=sometimes"],
     "--config.execution: ExecutionConfig.capacity_mode='sometimes' is not one of"),
    ("infer.py", ["--config.cpu_devices=3"],
     "16 experts do not split over the mesh's expert axis of 3 devices (--config.mesh.expert=-1"),
    ("infer.py", ["--config.data.max_input_tokens=4"],
     "tokens long, more than --config.data.max_input_tokens=4"),
])
def test_bad_input_is_one_line(script, args, message):
  text = ["--text=The assert statement"] if script == "infer.py" else []
  proc = _run(script, *args, *text, check=False)
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value, expected", [
    (None, os.path.expanduser("~/.cache/moe_jax/jax_cache")), ("/tmp/elsewhere", "/tmp/elsewhere"),
    ("0", "None")])
def test_compilation_cache_location_and_opt_out(value, expected):
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "MOE_JAX_COMPILATION_CACHE")}
  if value is not None:
    env["MOE_JAX_COMPILATION_CACHE"] = value
  code = ("import os, sys; sys.path.insert(0, 'launch'); import _setup; "
          "print(os.environ.get('JAX_COMPILATION_CACHE_DIR'))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=REPO, check=True, timeout=60)
  assert proc.stdout.strip() == expected


def test_simulate_refuses_stickiness_without_resident_replicas():
  proc = _run("simulate.py", "--stickiness=0.1", check=False)
  assert proc.returncode == 2 and "add --resident_replicas" in proc.stderr
  assert "Traceback" not in proc.stderr


def _fake_report():
  layers = ["encoder/0", "encoder/1", "decoder/0", "decoder/1"]

  def policy(balance, hit):
    return {"overall": {"balancedness": balance, "tokens_per_second": 1000.0},
            "layers": {k: {"tokens_per_device": [4, 1, 1, 2], "tokens_per_expert": [3, 1, 2, 2],
                           "hit_rate": None if k.endswith("/0") else hit} for k in layers}}

  modes = {mode: {"none": policy(0.4, None), "history": policy(0.7, None),
                  "pregate": policy(0.6, 0.5), "learned": policy(0.8, 0.7)}
           for mode in ("dropless", "capacity")}
  return {"meta": {"num_devices": 4, "platform": "cpu"}, "modes": modes}


def test_plots_say_what_they_show(tmp_path, monkeypatch):
  """Every device_load panel has a legend and both balancedness figures; the mode is named;
  the hit-rate plot labels its axis and says why first layers have no prediction; throughput
  says the simulated devices share the host's cores."""
  from moe_jax.bench import plots  # pylint: disable=import-outside-toplevel
  texts = {}
  save = plots._save

  def capture(fig, path, **kwargs):
    texts[os.path.basename(path)] = [t.get_text() for t in fig.texts] + [
        text for ax in fig.axes for text in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
    ] + [f"legend:{ax.get_legend() is not None}" for ax in fig.axes]
    return save(fig, path, **kwargs)

  monkeypatch.setattr(plots, "_save", capture)
  for path in plots.write_all(_fake_report(), str(tmp_path)):
    assert os.path.getsize(path) > 1000
  device = " ".join(texts["device_load.png"])
  assert "capacity mode dropless" in device and "legend:False" not in device
  assert device.count("per-layer mean") == 3 and device.count("pooled (bars)") == 3
  hits = " ".join(texts["predictor_hit_rate.png"])
  assert "MoE layer (stack/index)" in hits and "capacity mode dropless" in hits
  assert "n/a: encoder/0, decoder/0 - the first MoE layer of each stack" in hits
  assert "4 simulated CPU devices share this host's" in " ".join(texts["throughput.png"])
