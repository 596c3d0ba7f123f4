"""Process set-up shared by launch scripts; import it before anything imports jax.

  import _setup
  _setup.simulate_cpu_devices()      # honours --config.cpu_devices=N (default 8)
  ...
  if __name__ == "__main__":
    _setup.run(main)                 # absl app.run + one-line errors for UsageError
"""

import os
import re
import sys


def simulate_cpu_devices(count: int | None = None) -> None:
  """Ask XLA for N host (CPU) devices unless the user already chose a number.

  N is `count`, else the value of a --config.cpu_devices=N flag, else 8. Only the CPU platform
  reads this flag, so it is harmless on GPU/TPU hosts; it must be set before jax initialises.
  """
  if count is None:
    count = 8
    for arg in sys.argv[1:]:
      match = re.fullmatch(r"--config\.cpu_devices=(\d+)", arg)
      if match:
        count = int(match.group(1))
  flags = os.environ.get("XLA_FLAGS", "")
  if count > 1 and not re.search(r"--xla_force_host_platform_device_count=\d+", flags):
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_config(default: str):
  """`config_flags.DEFINE_config_file("config", ...)` with a default relative to the repo root.

  config_flags applies `--config.x=...` overrides while defining the flag, so an unknown key
  fails here: print one line naming it instead of a traceback.
  """
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  try:
    return config_flags.DEFINE_config_file("config", os.path.join(REPO, default),
                                           lock_config=True)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    print(f"error: bad --config override: {message}", file=sys.stderr)
    sys.exit(2)


def quiet_library_logs() -> None:
  """Keep INFO progress lines from moe_jax; drop orbax's and jax's INFO chatter."""
  import logging as py_logging  # pylint: disable=import-outside-toplevel

  class _Filter(py_logging.Filter):
    def filter(self, record):
      noisy = ("orbax" in record.pathname or "/jax/" in record.pathname
               or "etils" in record.pathname)
      return record.levelno >= py_logging.WARNING or not noisy

  for handler in py_logging.getLogger("absl").handlers + py_logging.getLogger().handlers:
    handler.addFilter(_Filter())


def run(main, *, multi_process: bool = True) -> None:
  """absl's app.run(main), printing a config/usage problem as one line instead of a traceback.

  Every launch script also takes --coordinator / --num_processes / --process_id (falling back to
  the cluster environment `jax.distributed.initialize` detects): the job is joined before `main`
  runs, so `jax.devices()` lists every process's devices. Scripts that only run on one process
  pass `multi_process=False` and refuse a multi-process job with a one-line error.
  """
  from absl import app, logging  # pylint: disable=import-outside-toplevel
  from moe_jax import distributed  # pylint: disable=import-outside-toplevel
  from moe_jax.app import config as config_lib  # pylint: disable=import-outside-toplevel

  distributed.define_flags()

  def guarded(argv):
    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    try:
      _join_job(distributed, config_lib, multi_process)
      return main(argv)
    except (config_lib.UsageError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  def parse_flags(argv):
    try:
      return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      message = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
      print(f"error: bad flag or config override: {message}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded, flags_parser=parse_flags)


def _join_job(distributed, config_lib, multi_process: bool) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  script = os.path.basename(sys.argv[0])
  if not multi_process and (flags.FLAGS.num_processes or 1) > 1:
    raise config_lib.UsageError(f"{script} runs as one process; drop --coordinator/--num_processes/"
                             "--process_id (multi-process: launch/bench.py, launch/infer.py, "
                             "launch/demo_layer.py, launch/distributed_demo.py).")
  if multi_process:
    distributed.initialize_from_flags()
