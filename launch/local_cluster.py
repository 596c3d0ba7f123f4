"""Runs N local processes of any launch script as one multi-process JAX job.

  python launch/local_cluster.py --num_processes=2 --devices_per_process=4 -- \
      python launch/distributed_demo.py --predictor=pregate

Each child gets `--coordinator=localhost:PORT --num_processes=N --process_id=i` appended to its
command (scripts read them with `moe_jax.distributed.define_flags`), its output is prefixed with
`[i] `, and the launcher exits non-zero if any child fails. After the first failure the others get
`--failure_grace_s` to notice on their own (the library's watchdog makes them exit) before they are
terminated.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "processes to start")
flags.DEFINE_integer("port", 0, "coordinator port on localhost (0: pick a free one)")
flags.DEFINE_integer("devices_per_process", None, "simulated CPU devices per process (sets "
                     "XLA_FLAGS=--xla_force_host_platform_device_count); unset: leave XLA_FLAGS")
flags.DEFINE_string("platform", None, "JAX_PLATFORMS for the children (e.g. cpu); unset: inherit")
flags.DEFINE_float("failure_grace_s", 60.0, "after a child fails, seconds the others get to exit "
                   "by themselves before they are terminated")
flags.DEFINE_float("timeout_s", 0.0, "terminate every child after this long (0: no limit)")


def free_port() -> int:
  """A TCP port that was free on localhost a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(base: dict, devices_per_process, platform) -> dict:
  """The children's environment: own device count and platform, nothing inherited that clashes."""
  env = dict(base)
  if devices_per_process is not None:
    rest = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (f"{rest} --xla_force_host_platform_device_count="
                        f"{devices_per_process}").strip()
  if platform:
    env["JAX_PLATFORMS"] = platform
  env["PYTHONUNBUFFERED"] = "1"
  return env


def child_command(command: list, coordinator: str, num_processes: int, process_id: int) -> list:
  return list(command) + [f"--coordinator={coordinator}", f"--num_processes={num_processes}",
                          f"--process_id={process_id}"]


def _pump(stream, prefix: str, lock: threading.Lock):
  for line in iter(stream.readline, b""):
    with lock:
      sys.stdout.write(prefix + line.decode(errors="replace"))
      sys.stdout.flush()
  stream.close()


def start(command: list, num_processes: int, port: int, env: dict):
  """Starts the children; returns (processes, output threads)."""
  coordinator = f"localhost:{port or free_port()}"
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    proc = subprocess.Popen(child_command(command, coordinator, num_processes, i), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] ", lock), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
  return procs, pumps


def supervise(procs: list, failure_grace_s: float, timeout_s: float) -> list:
  """Waits for every child; terminates the rest `failure_grace_s` after the first failure."""
  started = time.monotonic()
  first_failure = None
  while any(p.poll() is None for p in procs):
    now = time.monotonic()
    if first_failure is None and any(p.returncode not in (None, 0) for p in procs):
      first_failure = now
    late = first_failure is not None and now - first_failure > failure_grace_s
    if late or (timeout_s and now - started > timeout_s):
      reason = "a peer failed" if late else f"--timeout_s={timeout_s} passed"
      terminate([p for p in procs if p.poll() is None], reason)
      break
    time.sleep(0.1)
  return [p.wait() for p in procs]


def terminate(procs: list, reason: str):
  for p in procs:
    print(f"[local_cluster] terminating pid {p.pid} ({reason})", flush=True)
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + 10
  for p in procs:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(p, signal.SIGKILL)


def _signal_group(proc, sig):
  try:
    os.killpg(proc.pid, sig)
  except ProcessLookupError:
    pass


def describe(code: int) -> str:
  if code < 0:
    return f"killed by {signal.Signals(-code).name}"
  return f"exited with status {code}"


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError("give the command to run after `--`, e.g. "
                         "local_cluster.py --num_processes=2 -- python launch/distributed_demo.py")
  if FLAGS.num_processes < 1:
    raise app.UsageError(f"--num_processes={FLAGS.num_processes} must be >= 1.")
  env = child_env(os.environ, FLAGS.devices_per_process, FLAGS.platform)
  procs, pumps = start(command, FLAGS.num_processes, FLAGS.port, env)
  try:
    codes = supervise(procs, FLAGS.failure_grace_s, FLAGS.timeout_s)
  except KeyboardInterrupt:
    terminate([p for p in procs if p.poll() is None], "interrupted")
    codes = [p.wait() for p in procs]
  for pump in pumps:
    pump.join(timeout=5)
  for i, code in enumerate(codes):
    print(f"[local_cluster] process {i} {describe(code)}", flush=True)
  failed = [c for c in codes if c != 0]
  sys.exit(0 if not failed else (failed[0] if 0 < failed[0] < 256 else 1))


if __name__ == "__main__":
  app.run(main)
