"""Process set-up shared by launch scripts; import it before anything imports jax."""

import os
import re


def simulate_cpu_devices(count: int = 8) -> None:
  """Ask XLA for `count` host (CPU) devices unless the user already chose a number.

  Only the CPU platform reads this flag, so it is harmless on GPU/TPU hosts; it must be set before
  jax initialises its backends.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if count > 1 and not re.search(r"--xla_force_host_platform_device_count=\d+", flags):
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
