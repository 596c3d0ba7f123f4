"""Multi-process JAX: a 2-process x 4-device job on localhost equals one 8-device process, and a
killed peer makes the survivor exit with a clear error instead of hanging.

The worker side of these tests is this file run as a module (`python -m tests.test_distributed
--worker=...`), started through launch/local_cluster.py in fresh subprocesses with their own
XLA_FLAGS (4 CPU devices each); the pytest process itself (8 devices, tests/conftest.py) computes
the single-process reference with the same functions.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import moe_jax
from moe_jax import distributed, replication
from moe_jax.models import moe_stack, switch
from moe_jax.models.switch import SwitchConfig
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWITCH = SwitchConfig(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1,
                      num_decoder_layers=1, num_sparse_encoder_layers=1,
                      num_sparse_decoder_layers=1, num_experts=8, expert_capacity=None,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
# The grouped matmul is process-local (its backends have their own tests); "dense" compiles in a
# third of the time of the CPU default. That matters here: jax writes the persistent compilation
# cache from process 0 only, and process 1's entries never match, so process 1 compiles every run.
GMM_BACKEND = "dense"
STACK_CFG = moe_jax.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32)
STACK_EXECUTION = moe_jax.ExecutionConfig(gmm_backend=GMM_BACKEND)
STACK_REPLICATION = replication.ReplicationConfig(predictor="pregate", num_replica_slots=2)
STACK_LAYERS = 3
SWITCH_MESH = (2, 4)   # data spans the 2 processes; the expert all-to-all stays in one process
STACK_MESH = (1, 8)    # the expert all-to-all spans both processes

pytestmark = pytest.mark.distributed


# --- the workload, identical in the workers and the reference ---------------------------------


def switch_outputs(mesh) -> dict:
  """Teacher-forced Switch forward on a tiny random model; gathered numpy results."""
  rng = np.random.default_rng(0)
  ids = rng.integers(2, SWITCH.vocab_size, (4, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[3, -2:] = 0
  dec_ids = switch.shift_right(rng.integers(2, SWITCH.vocab_size, (4, 6)), SWITCH)
  rows = distributed.local_batch_rows(ids.shape[0], mesh)
  batch = [distributed.from_process_local(np.asarray(a)[rows], mesh, P("data"), np.shape(a))
           for a in (ids, mask, dec_ids)]
  params = distributed.from_host(switch.random_params(SWITCH, seed=0), mesh)
  moe_fn = moe_jax.DefaultMoE(switch.moe_config(SWITCH, np.float32),
                              moe_jax.ExecutionConfig(gmm_backend=GMM_BACKEND), mesh)

  @jax.jit
  def forward(params, ids, mask, dec_ids):
    out = switch.forward(params, SWITCH, ids, mask, dec_ids, moe_fn=moe_fn)
    records = out.router.encoder + out.router.decoder
    return {"logits": out.logits, "encoder_hidden": out.encoder_last_hidden_state,
            "tokens_per_device": jnp.stack([r.stats.tokens_per_device for r in records])}

  return distributed.gather(forward(params, *batch))


def stack_outputs(mesh) -> dict:
  """A skewed MoE stack with replicas placed by the pregate predictor."""
  cfg = STACK_CFG
  params = moe_stack.init(jax.random.key(0), cfg, STACK_LAYERS)
  for layer in params["layers"]:
    layer["moe"]["router"] = helpers.skewed_params(cfg)["router"]
  params = distributed.from_host(jax.tree.map(np.asarray, params), mesh)
  h = np.asarray(helpers.skewed_tokens(cfg, 4, 16))
  h = distributed.from_process_local(h[distributed.local_batch_rows(4, mesh)], mesh, P("data"),
                                     h.shape)
  state = distributed.from_host(
      replication.init_state({moe_stack.STACK: STACK_LAYERS}, cfg.num_experts), mesh)

  @jax.jit
  def run(params, h, state):
    runner = replication.StackRunner(STACK_REPLICATION, cfg, mesh, moe_stack.moe_layers(params),
                                     state, execution=STACK_EXECUTION)
    out, _ = moe_stack.forward(params, h, runner.moe_fn)
    records = runner.records()[moe_stack.STACK]
    return {"out": out,
            "slot_tables": jnp.stack([r.slot_table for r in records]),
            "tokens_per_device": jnp.stack([r.stats.tokens_per_device for r in records]),
            "predicted_load": jnp.stack([r.predicted_load for r in records])}

  return distributed.gather(run(params, h, state))


# --- the worker (run as `python -m tests.test_distributed`) -----------------------------------


def _worker(argv):
  del argv
  from absl import flags
  info = distributed.initialize_from_flags()
  if os.environ.get("MOE_JAX_TEST_CACHE"):
    # Its own cache per process count: the cache key is not documented to cover the process
    # topology, so 2 x 4 and 1 x 8 executables of the same program are kept apart.
    cache = f"{os.environ['MOE_JAX_TEST_CACHE']}-{info.num_processes}proc"
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if flags.FLAGS.worker == "compute":
    _compute(info, flags.FLAGS.out)
  else:
    _step_until_killed(info, flags.FLAGS.victim)


def _compute(info, out):
  """Both workloads on meshes spanning the processes; process 0 saves the gathered results."""
  results, start = {}, time.monotonic()
  results.update({f"switch/{k}": v for k, v in
                  switch_outputs(distributed.make_global_mesh(*SWITCH_MESH)).items()})
  print(f"process {info.process_id}: switch {time.monotonic() - start:.1f} s", flush=True)
  results.update({f"stack/{k}": v for k, v in
                  stack_outputs(distributed.make_global_mesh(*STACK_MESH)).items()})
  print(f"process {info.process_id}: stack {time.monotonic() - start:.1f} s", flush=True)
  if info.is_leader:
    np.savez(out, **results)


def _step_until_killed(info, victim):
  """A loop of cross-process collectives; process `victim` SIGKILLs itself at step 3."""
  mesh = distributed.make_global_mesh(1, len(jax.devices()))
  x = distributed.from_host(np.arange(len(jax.devices()), dtype=np.float32), mesh, P("expert"))
  step = jax.jit(lambda x: x * 0.5 + jnp.mean(x))
  for i in range(2000):
    if i == 3 and info.process_id == victim:
      print(f"process {info.process_id}: killing myself", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    x = step(x).block_until_ready()
    time.sleep(0.05)
  print("survived the whole loop: the lost peer was never detected", flush=True)


def _worker_main():
  from absl import app, flags
  distributed.define_flags()
  flags.DEFINE_enum("worker", "compute", ["compute", "die"], "what to run")
  flags.DEFINE_string("out", None, "npz for process 0's gathered results")
  flags.DEFINE_integer("victim", 1, "process that kills itself (worker=die)")
  app.run(_worker)


# --- the tests ---------------------------------------------------------------------------------


def _start_cluster(worker_args, *, timeout_s, watchdog_s=20, failure_grace_s=120):
  """Starts 2 x 4-device workers through launch/local_cluster.py; returns the Popen."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  env.setdefault("MOE_JAX_TEST_CACHE", os.path.expanduser(
      "~/.cache/moe_jax/test_compilation_cache"))
  command = [sys.executable, str(ROOT / "launch" / "local_cluster.py"), "--num_processes=2",
             "--devices_per_process=4", "--platform=cpu", f"--failure_grace_s={failure_grace_s}",
             f"--timeout_s={timeout_s}", "--", sys.executable, "-m", "tests.test_distributed",
             "--heartbeat_timeout_s=60", f"--watchdog_s={watchdog_s}"] + worker_args
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, *, timeout_s):
  """(returncode, output) of a `_start_cluster` job."""
  output, _ = proc.communicate(timeout=timeout_s + 60)
  return proc.returncode, output


def _cluster(worker_args, *, timeout_s, **kwargs):
  """Runs a `_start_cluster` job to the end: (returncode, output, seconds)."""
  start = time.monotonic()
  code, output = _finish(_start_cluster(worker_args, timeout_s=timeout_s, **kwargs),
                         timeout_s=timeout_s)
  return code, output, time.monotonic() - start


def test_single_process_helpers():
  # Without a cluster every helper degrades to plain single-process jax.
  assert distributed.initialize() == distributed.ProcessInfo()
  with pytest.raises(ValueError, match="needs a port"):
    distributed.initialize("localhost", 2, 0)
  with pytest.raises(ValueError, match="outside"):
    distributed.initialize("localhost:1", 2, 2)
  mesh = distributed.make_global_mesh(2, 4)
  assert [d.id for d in mesh.devices.ravel()] == sorted(d.id for d in jax.devices())
  with pytest.raises(ValueError, match="must use all 8 devices"):
    distributed.make_global_mesh(1, 4)
  assert distributed.local_batch_rows(6, mesh) == slice(0, 6)
  x = np.arange(24, dtype=np.float32).reshape(6, 4)
  sharded = distributed.from_process_local(x, mesh, P("data"))
  assert sharded.sharding.spec == P("data")
  np.testing.assert_array_equal(distributed.gather({"x": sharded, "n": 3})["x"], x)
  np.testing.assert_array_equal(distributed.gather(distributed.from_host(x, mesh)), x)


def test_two_processes_match_one_process():
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "results.npz")
    job = _start_cluster(["--worker=compute", f"--out={out}"], timeout_s=240)
    # The single-process reference, while the workers run.
    want = {f"switch/{k}": v for k, v in switch_outputs(moe_jax.make_mesh(*SWITCH_MESH)).items()}
    want.update({f"stack/{k}": v
                 for k, v in stack_outputs(moe_jax.make_mesh(*STACK_MESH)).items()})
    code, log = _finish(job, timeout_s=240)
    assert code == 0, log[-4000:]
    got = dict(np.load(out))
  assert sorted(got) == sorted(want)
  for name in want:
    if np.issubdtype(want[name].dtype, np.floating):
      assert helpers.rel_err(got[name], want[name]) <= 1e-6, name
    else:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # Replicas were placed (layers 1, 2: by pregate), some on the other process's devices.
  assert (got["stack/slot_tables"][1:, :, 1:] >= 0).any()


def test_killed_peer_makes_the_survivor_exit_naming_it():
  code, log, seconds = _cluster(["--worker=die", "--victim=1"], timeout_s=60, watchdog_s=5)
  assert seconds <= 60, log[-4000:]
  assert "survived the whole loop" not in log
  survivor = re.search(r"\[local_cluster\] process 0 (.*)", log)
  assert survivor and "exited with status 75" in survivor.group(1), log[-4000:]
  assert "process 1 of 2 sent no heartbeat" in log, log[-4000:]
  assert code != 0


def test_killed_coordinator_makes_the_survivor_exit():
  # When process 0 (the coordination service) dies, jax itself aborts the others at once.
  code, log, seconds = _cluster(["--worker=die", "--victim=0"], timeout_s=60, watchdog_s=5)
  assert seconds <= 60, log[-4000:]
  survivor = re.search(r"\[local_cluster\] process 1 (.*)", log)
  assert survivor and survivor.group(1) != "exited with status 0", log[-4000:]
  assert re.search(r"leader task|coordinator \(process 0\)", log), log[-4000:]
  assert code != 0


if __name__ == "__main__":
  _worker_main()
