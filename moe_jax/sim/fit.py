"""Measuring a machine for the simulator: expert-GEMM FLOP/s, memory bandwidth, all-to-all, and
the decode cost model's weight-read bytes/s and per-row FLOP/s at a few rows per expert.

Each function times a small jitted program (median of `repeats` after a warm-up) on whatever
devices it is given; `benchmarks/straggler.py` calls them on its own pinned cores and fits a
`Cluster` from the results, so the simulator can be checked against the measured step times
(it measures `Cluster.layer_overhead_s`, the fixed cost of a layer, with a step whose experts
are empty).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax import grouped_matmul


def median_seconds(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def expert_flops_per_s(tokens: int, d_model: int, d_ff: int, *, device=None,
                       repeats: int = 5) -> float:
  """FLOP/s of one dense expert FFN, x <f32>[tokens, d] -> relu(x wi) wo, on one device."""
  device = device or jax.local_devices()[0]
  key = jax.random.key(0)
  x = jax.device_put(jax.random.normal(key, (tokens, d_model)), device)
  wi = jax.device_put(jax.random.normal(key, (d_model, d_ff)) * d_model ** -0.5, device)
  wo = jax.device_put(jax.random.normal(key, (d_ff, d_model)) * d_ff ** -0.5, device)
  ffn = jax.jit(lambda x, wi, wo: jax.nn.relu(x @ wi) @ wo)
  return 4.0 * tokens * d_model * d_ff / median_seconds(ffn, x, wi, wo, repeats=repeats)


def memory_bytes_per_s(num_bytes: int = 1 << 28, *, device=None, repeats: int = 5) -> float:
  """Bytes/s of streaming a large f32 array once (a reduction reads every byte)."""
  device = device or jax.local_devices()[0]
  x = jax.device_put(jnp.ones((num_bytes // 4,), jnp.float32), device)
  total = jax.jit(jnp.sum)
  return num_bytes / median_seconds(total, x, repeats=repeats)


def decode_fit(d_model: int, d_ff: int, *, activation: str = "relu",
               rows=(1, 2, 4, 8, 16, 32), min_bytes: int = 1 << 26, device=None,
               repeats: int = 5) -> tuple[float, float]:
  """(decode bytes/s, decode FLOP/s) of one device: `Cluster.decode_bytes_per_s` / `_flops_per_s`.

  Runs moe_jax's grouped FFN (the backend the layer uses here) over G f32 experts, enough that
  their weights exceed `min_bytes` and stream from memory rather than cache, with n rows each for
  every n in `rows`, and fits seconds / G = expert bytes / bytes/s + n * FLOPs per row / FLOP/s
  by least squares (the intercept is the weight read, the slope the per-row work).
  """
  device = device or jax.local_devices()[0]
  matrices = 3 if activation == "silu" else 2
  expert_bytes = 4 * matrices * d_model * d_ff
  groups = max(1, -(-min_bytes // expert_bytes))
  names = ("wi", "wo", "wi_gate")[:matrices]
  shapes = {"wi": (groups, d_model, d_ff), "wo": (groups, d_ff, d_model),
            "wi_gate": (groups, d_model, d_ff)}
  weights = {k: jax.device_put(jnp.full(shapes[k], 0.01, jnp.float32), device) for k in names}
  ffn = jax.jit(lambda x, sizes, w: grouped_matmul.grouped_ffn(x, sizes, w,
                                                               activation=activation))
  per_group = []
  for n in rows:
    x = jax.device_put(jnp.ones((groups * n, d_model), jnp.float32), device)
    sizes = jax.device_put(jnp.full((groups,), n, jnp.int32), device)
    per_group.append(median_seconds(ffn, x, sizes, weights, repeats=repeats) / groups)
  slope, intercept = np.polyfit(np.asarray(rows, np.float64), np.asarray(per_group), 1)
  flops_per_row = 2.0 * matrices * d_model * d_ff
  return (float(expert_bytes / max(intercept, 1e-12)),
          float(flops_per_row / max(slope, 1e-15)))


def all_to_all_fit(mesh, sizes=(1 << 16, 1 << 22), *, repeats: int = 5) -> tuple[float, float]:
  """(bytes/s, latency s) of a tiled all-to-all over the mesh's 'expert' axis.

  Times the collective for two per-device buffer sizes (bytes) and fits time = latency +
  bytes sent per device / bandwidth, where a device sends (De - 1) / De of its buffer.
  """
  num_devices = mesh.shape["expert"]
  sharding = NamedSharding(mesh, P(("data", "expert")))
  a2a = jax.jit(jax.shard_map(lambda x: jax.lax.all_to_all(x, "expert", 0, 0, tiled=True),
                              mesh=mesh, in_specs=P(("data", "expert")),
                              out_specs=P(("data", "expert"))))
  points = []
  for size in sizes:
    rows = max(num_devices, size // 4 // 256) // num_devices * num_devices
    shape = (rows * mesh.size, 256)
    x = jax.make_array_from_callback(shape, sharding,
                                     lambda idx: np.ones(shape, np.float32)[idx])
    sent = rows * 256 * 4 * (num_devices - 1) / num_devices
    points.append((sent, median_seconds(a2a, x, repeats=repeats)))
  (b0, t0), (b1, t1) = points
  bandwidth = (b1 - b0) / max(t1 - t0, 1e-9)
  latency = max(t0 - b0 / bandwidth, 0.0)
  return float(bandwidth), float(latency)

