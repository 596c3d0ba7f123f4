"""Test setup: 8 simulated CPU devices and a persistent compilation cache, before jax initialises."""

import gc
import os
import re

_flags = os.environ.get("XLA_FLAGS", "")
_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", _flags)
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MOE_JAX_TEST_CACHE",
                                 os.path.expanduser("~/.cache/moe_jax/test_compilation_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

if len(jax.devices()) != 8:
  raise RuntimeError(f"tests need 8 CPU devices, got {jax.devices()}: jax was initialised before "
                     "tests/conftest.py could set XLA_FLAGS.")


@pytest.fixture(autouse=True, scope="module")
def _free_executables_after_each_module():
  """Drops jax's in-memory executables (and their JIT code mappings) after every test module.

  Every XLA:CPU executable a process holds keeps a few memory mappings; one pytest process
  running the whole suite accumulated ~40k of them by 60% of the way, and XLA crashed
  (SIGSEGV inside compilation or cache serialisation) when the process neared Linux's
  vm.max_map_count (65530). Later modules reload what they need from the persistent cache.
  """
  yield
  jax.clear_caches()
  gc.collect()
