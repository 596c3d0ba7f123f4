"""Mesh construction: named axes ('data', 'expert'), built so `shard_map` accepts it on any jax."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "expert")


def make_mesh(data: int = 1, expert: int | None = None, *, devices=None) -> Mesh:
  """A ('data', 'expert') mesh over the first data * expert devices.

  Args:
    data: size of the data axis (token/batch sharding, experts replicated).
    expert: size of the expert axis (experts sharded); default: all remaining devices.
    devices: devices to use; default `jax.devices()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  if expert is None:
    expert = max(1, len(devices) // max(data, 1))
  for name, size in (("data", data), ("expert", expert)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"mesh axis {name!r} must be a positive int, got {size!r}.")
  needed = data * expert
  if needed > len(devices):
    raise ValueError(
        f"a mesh of data={data} x expert={expert} needs {needed} devices but only {len(devices)} "
        f"are visible ({jax.default_backend()}). On CPU, simulate more by setting "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} before jax is imported, or "
        "choose smaller axes.")
  grid = np.asarray(devices[:needed], dtype=object).reshape(data, expert)
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    try:
      return Mesh(grid, AXES, axis_types=(axis_type.Auto,) * 2)
    except TypeError:  # jax without axis_types on Mesh
      pass
  return Mesh(grid, AXES)


def axis_sizes(mesh: Mesh) -> tuple[int, int]:
  """(data, expert) sizes of a mesh; ValueError if it lacks those axes."""
  missing = [a for a in AXES if a not in mesh.shape]
  if missing:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)} lack {missing}; build the mesh with "
                     "moe_jax.make_mesh(data=..., expert=...).")
  extra = [a for a in mesh.axis_names if a not in AXES and mesh.shape[a] != 1]
  if extra:
    raise ValueError(f"mesh has axes {extra} of size > 1, which moe_apply does not shard over; "
                     "use a ('data', 'expert') mesh.")
  return mesh.shape["data"], mesh.shape["expert"]


def is_cpu(mesh: Mesh) -> bool:
  """Whether the mesh's devices are CPUs (whose collectives are synchronous: see
  `collectives.in_order`)."""
  return mesh.devices.flat[0].platform == "cpu"


def on_every_device(fn, mesh: Mesh):
  """`fn` computed whole on every device of `mesh`: its inputs and outputs are replicated.

  For the small replicated bookkeeping of a layer (load estimates, slot tables). Left to sharding
  propagation, such an op may be split over an axis and gathered back: a collective, i.e. a
  device-wide sync point, for a few dozen integers (~4 ms each on XLA:CPU across processes).
  """
  spec = jax.sharding.PartitionSpec()
  return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
