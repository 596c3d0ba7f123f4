"""Process set-up shared by launch scripts; import it before anything imports jax.

  import _setup
  _setup.simulate_cpu_devices()      # honours --config.cpu_devices=N (default 8)
  ...
  if __name__ == "__main__":
    _setup.run(main)                 # absl app.run + one-line errors for UsageError

Importing it turns on jax's persistent compilation cache (see `enable_compilation_cache`), so a
second run of a script loads its compiled programs instead of compiling them again.
"""

import difflib
import importlib.util
import os
import re
import sys

CACHE_ENV = "MOE_JAX_COMPILATION_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "moe_jax", "jax_cache")


def enable_compilation_cache() -> str | None:
  """Points jax's persistent compilation cache at ~/.cache/moe_jax/jax_cache; returns the dir.

  $MOE_JAX_COMPILATION_CACHE overrides the directory; set it to 0 (or off, or empty) to turn the
  cache off. A JAX_COMPILATION_CACHE_DIR the user exported wins over both. Programs that compile
  in under 0.2 s are not stored. Works through jax's environment variables, so it must run
  before jax is imported.
  """
  chosen = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
  if chosen.strip().lower() in ("", "0", "off", "false", "no"):
    return None
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser(chosen))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


enable_compilation_cache()


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
_DEFAULT_CONFIG = None   # the script's default config file, once `define_config` ran


def define_config(default: str):
  """`config_flags.DEFINE_config_file("config", ...)` with a default relative to the repo root.

  config_flags loads the default config and applies `--config.x=...` overrides while defining
  the flag (or, with --config=FILE, while parsing flags), so a bad override fails here or in
  `run`: either way it is one line naming the key and the valid keys closest to it.
  """
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  global _DEFAULT_CONFIG
  default = _DEFAULT_CONFIG = os.path.join(REPO, default)
  try:
    return config_flags.DEFINE_config_file("config", default, lock_config=True)
  except Exception as e:  # pylint: disable=broad-except  (config_flags raises many kinds)
    _exit_usage(override_error(e, default))


def override_error(error: Exception, default: str) -> str:
  """One line for a failed --config.* override: the first key that is not in the config tree
  with the valid keys closest to it, else config_flags' own message without its newlines."""
  message = " ".join(str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'").split())
  spec = _config_spec(default)
  tree = _config_paths(spec)
  if tree is None:
    return f"--config={spec} does not load: {last_line(error)}"
  for key in _override_keys():
    if key in tree or any(path.startswith(key + ".") for path in tree):
      continue
    parent = key.rpartition(".")[0]
    if parent not in _config_groups(tree):
      parent = ""
    prefix = parent + "." if parent else ""
    siblings = sorted({p[len(prefix):].split(".")[0] for p in tree if p.startswith(prefix)})
    leaf = key[len(prefix):]
    # Near misses of the same level, then keys elsewhere whose own name is very close.
    close = [prefix + c for c in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
    close += [p for p in tree if p not in close and difflib.get_close_matches(
        leaf.rpartition(".")[2], [p.rpartition(".")[2]], cutoff=0.8)][:3]
    hint = f" did you mean {' or '.join('--config.' + c for c in close)}?" if close else ""
    group = "--config." + parent if parent else "--config"
    return (f"--config.{key} is not a config key;{hint} the keys of {group} are: "
            f"{', '.join(siblings)}.")
  return f"bad --config override: {message}"


def last_line(error: Exception) -> str:
  """The last non-empty line of an error's message (the exception of an embedded traceback)."""
  lines = [line.strip() for line in str(error).replace("\\n", "\n").splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def flag_error(error: Exception) -> str:
  """absl's message for a bad flag value in one line: "flag --NAME=VALUE: <the last line>"."""
  lines = str(error).strip().splitlines()
  head = re.match(r"(flag --\S+): ", lines[0]) if lines else None
  if len(lines) <= 1 or head is None:
    return " ".join(str(error).split())
  return f"{head.group(1)}: {last_line(error)}"


def _config_spec(default: str) -> str:
  """The --config=... value on the command line, else the script's default."""
  for i, arg in enumerate(sys.argv[1:], 1):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return default


def _override_keys() -> list[str]:
  """The dotted keys of the --config.KEY=VALUE (or --[no]config.KEY) flags, in order."""
  keys = []
  for arg in sys.argv[1:]:
    match = re.match(r"--(?:no)?config\.([^=]+)", arg)
    if match:
      keys.append(match.group(1))
  return keys


def _config_paths(spec: str) -> list[str] | None:
  """Every dotted key of the config file `spec` ("path[:arg]"), or None if it does not load."""
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_launch_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    tree = config.to_dict()
  except Exception:  # pylint: disable=broad-except  (any failure: fall back to the raw message)
    return None

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"

  return list(walk(tree, ""))


def _config_groups(paths: list[str]) -> set[str]:
  return {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)}


def _exit_usage(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
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
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel
  from moe_jax import distributed  # pylint: disable=import-outside-toplevel
  from moe_jax.app import config as config_lib  # pylint: disable=import-outside-toplevel

  distributed.define_flags()

  def guarded(argv):
    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache:
      logging.info("compiled programs are cached in %s (%s=0 turns this off)", cache, CACHE_ENV)
    try:
      _join_job(distributed, config_lib, multi_process)
      return main(argv)
    except (config_lib.UsageError, FileNotFoundError) as e:
      _exit_usage(str(e))

  def parse_flags(argv):
    try:
      rest = flags.FLAGS(argv)
      if "config" in flags.FLAGS:
        flags.FLAGS.config.to_dict()   # config_flags defers a failed --config=FILE to first use
      return rest
    except flags.Error as e:                    # a bad flag value, an unknown flag
      _exit_usage(flag_error(e))
    except Exception as e:  # pylint: disable=broad-except  (config_flags raises many kinds)
      if _DEFAULT_CONFIG is None:
        raise
      _exit_usage(override_error(e, _DEFAULT_CONFIG))

  app.run(guarded, flags_parser=parse_flags)


def _join_job(distributed, config_lib, multi_process: bool) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  script = os.path.basename(sys.argv[0])
  if not multi_process and (flags.FLAGS.num_processes or 1) > 1:
    raise config_lib.UsageError(
        f"{script} runs as one process; drop --coordinator/--num_processes/--process_id "
        "(multi-process: launch/bench.py, launch/infer.py, launch/demo_layer.py, "
        "launch/distributed_demo.py).")
  if multi_process:
    distributed.initialize_from_flags()
