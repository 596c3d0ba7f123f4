"""Multi-process (multi-controller) JAX: start-up, meshes across processes, batches, gathers.

On a GPU/TPU cluster every host runs the same program; `jax.distributed.initialize` joins them
into one job whose `jax.devices()` lists every device of every process. The same works with
several processes on one machine (CPU collectives via gloo), which is how the tests run it.

  from moe_jax import distributed
  distributed.define_flags()                        # --coordinator --num_processes --process_id
  ...
  info = distributed.initialize_from_flags()        # before any jax computation
  mesh = distributed.make_global_mesh(data=2, expert=4)
  x = distributed.from_process_local(my_rows, mesh, P("data"), global_shape)
  y = distributed.gather(jitted_fn(x))              # numpy, on every process
  if info.is_leader: print(y)

A lost peer never hangs the survivors: jax's coordination service aborts every task once one stops
sending heartbeats (`heartbeat_timeout_s`), and the watchdog started here exits earlier, with a
message naming the lost process (see `Watchdog`).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import threading
import time

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax import mesh as mesh_lib

LOST_PEER_EXIT_CODE = 75  # EX_TEMPFAIL: the job can be restarted
_KEY_PREFIX = "moe_jax/watchdog"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process stands in the job.

  Attributes:
    process_id: this process, 0 .. num_processes - 1 (0 is the coordinator / leader).
    num_processes: processes in the job (1: plain single-process jax).
    coordinator_address: "host:port" of the coordination service, None for one process.
  """

  process_id: int = 0
  num_processes: int = 1
  coordinator_address: str | None = None

  @property
  def is_leader(self) -> bool:
    return self.process_id == 0


# --- start-up ------------------------------------------------------------------------------------


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               initialization_timeout_s: int = 300, heartbeat_timeout_s: int = 100,
               watchdog_timeout_s: float | None = None) -> ProcessInfo:
  """Joins this process to a multi-process JAX job; a no-op for a single process.

  Explicit values are passed to `jax.distributed.initialize`; whatever is None is auto-detected
  from the cluster environment (Slurm, Open MPI, Cloud TPU, Kubernetes, JAX_COORDINATOR_ADDRESS).
  With nothing given and no cluster detected, or with num_processes=1, nothing is initialised.
  Call it before any jax computation. Calling it again returns the same `ProcessInfo`.

  Args:
    coordinator_address: "host:port" of process 0's coordination service.
    num_processes: processes in the job.
    process_id: this process's index.
    local_device_ids: optional devices of this host the process may use (GPU: one per process).
    initialization_timeout_s: how long to wait for every process to join.
    heartbeat_timeout_s: jax aborts the job this long after a process stops sending heartbeats.
    watchdog_timeout_s: the `Watchdog` declares a silent peer lost after this long (default: half
      of `heartbeat_timeout_s`, so its clearer message comes first); 0 disables it.

  Returns:
    This process's `ProcessInfo`.
  """
  if jax.distributed.is_initialized():
    return process_info()
  if num_processes == 1 or (
      coordinator_address is None and num_processes is None and process_id is None
      and not _cluster_detected()):
    return ProcessInfo()
  _check_args(coordinator_address, num_processes, process_id)
  _enable_cpu_collectives()
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=int(initialization_timeout_s),
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  except ValueError as e:  # a value jax could neither be given nor auto-detect
    raise ValueError(f"{e} Give every process the same --coordinator=host:port and "
                     "--num_processes, and its own --process_id (or run under Slurm / Open MPI / "
                     "a TPU pod, where jax detects them).") from e
  info = process_info()
  if watchdog_timeout_s is None:
    watchdog_timeout_s = heartbeat_timeout_s / 2
  if watchdog_timeout_s and info.num_processes > 1:
    Watchdog(timeout_s=watchdog_timeout_s).start()
  return info


def process_info() -> ProcessInfo:
  """This process's `ProcessInfo` (process 0 of 1 without `initialize`)."""
  if not jax.distributed.is_initialized():
    return ProcessInfo()
  return ProcessInfo(process_id=jax.process_index(), num_processes=jax.process_count(),
                     coordinator_address=_global_state().coordinator_address)


def _check_args(coordinator_address, num_processes, process_id):
  if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
    raise ValueError(f"num_processes={num_processes!r} must be a positive int (the number of "
                     "processes in the job), e.g. --num_processes=2.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, {num_processes}); number the "
                     f"processes 0 .. {num_processes - 1}.")
  if coordinator_address is not None and ":" not in coordinator_address:
    raise ValueError(f"coordinator_address={coordinator_address!r} needs a port: 'host:port', "
                     "e.g. --coordinator=localhost:12345 (every process passes the same value).")


def _cluster_detected() -> bool:
  """Whether jax's auto-detection would find a cluster (Slurm, MPI, TPU pod, ...)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  try:
    from jax._src import clusters  # private: the registry jax's own auto-detection walks
  except ImportError:
    return False
  return any(not env.opt_in_only_method and env.is_env_present()
             for env in clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access


def _enable_cpu_collectives():
  """Cross-process CPU collectives need gloo (the default on recent jax, opt-in on older ones)."""
  try:
    current = jax.config.jax_cpu_collectives_implementation
  except AttributeError:
    return
  if current in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _global_state():
  from jax._src import distributed as jax_distributed  # private: holds the runtime client
  return jax_distributed.global_state


# --- flags ---------------------------------------------------------------------------------------


def define_flags(flag_values=flags.FLAGS) -> None:
  """Defines --coordinator, --num_processes, --process_id, --heartbeat_timeout_s, --watchdog_s."""
  flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process jobs); unset: "
                      "auto-detect the cluster, or run as one process", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "processes in the job", flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "this process's index", flag_values=flag_values)
  flags.DEFINE_integer("heartbeat_timeout_s", 100, "jax aborts the job this long after a process "
                       "stops sending heartbeats", flag_values=flag_values)
  flags.DEFINE_float("watchdog_s", None, "exit with a message naming a lost peer after this "
                     "long (default: heartbeat_timeout_s / 2; 0: off)", flag_values=flag_values)


def initialize_from_flags(flag_values=flags.FLAGS, **kwargs) -> ProcessInfo:
  """`initialize` with the values of the flags from `define_flags` (kwargs are passed on)."""
  return initialize(flag_values.coordinator, flag_values.num_processes, flag_values.process_id,
                    heartbeat_timeout_s=flag_values.heartbeat_timeout_s,
                    watchdog_timeout_s=flag_values.watchdog_s, **kwargs)


# --- meshes, batches, gathers --------------------------------------------------------------------


def process_ordered_devices(devices=None) -> list:
  """Devices sorted by (process, id), so each process's devices are contiguous."""
  devices = jax.devices() if devices is None else devices
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def make_global_mesh(data: int = 1, expert: int | None = None, *, devices=None):
  """A ('data', 'expert') mesh over every process's devices, each process's devices contiguous.

  Devices are laid out row-major in process order: when a process has at least `expert` devices
  it owns whole rows of the mesh (the expert all-to-all stays inside a process, the data axis
  spans processes); otherwise consecutive processes share each row.

  Args:
    data, expert: axis sizes; `expert` defaults to all devices / data. data * expert must be the
      number of devices in the job (a mesh that skips some processes' devices would leave them
      idle).
    devices: default `jax.devices()` (all processes).
  """
  devices = process_ordered_devices(devices)
  if expert is None:
    expert = max(1, len(devices) // max(data, 1))
  if isinstance(data, int) and isinstance(expert, int) and data * expert != len(devices):
    raise ValueError(
        f"a global mesh of data={data} x expert={expert} = {data * expert} devices must use all "
        f"{len(devices)} devices of the {jax.process_count()} processes; choose axes whose "
        f"product is {len(devices)}.")
  local = len([d for d in devices if d.process_index == devices[0].process_index])
  if isinstance(expert, int) and expert % local and local % expert:
    raise ValueError(
        f"expert={expert} would split a process's {local} devices across mesh rows unevenly; "
        f"choose an expert axis that divides {local} or is a multiple of it.")
  return mesh_lib.make_mesh(data, expert, devices=devices)


def local_batch_rows(global_batch: int, mesh, batch_axes=("data",)) -> slice:
  """The rows of a global batch this process feeds when dim 0 is sharded over `batch_axes`.

  With data=1 (dim 0 replicated) every process feeds the whole batch.
  """
  sharding = NamedSharding(mesh, P(tuple(batch_axes)))
  indices = sharding.addressable_devices_indices_map((global_batch,))
  starts = sorted({idx[0].start or 0 for idx in indices.values()})
  stops = sorted({global_batch if idx[0].stop is None else idx[0].stop
                  for idx in indices.values()})
  if any(b != a for a, b in zip(stops[:-1], starts[1:])):
    raise ValueError(f"this process's rows of the batch are not contiguous under {batch_axes}; "
                     "build the mesh with distributed.make_global_mesh.")
  return slice(starts[0], stops[-1])


def from_process_local(local_data, mesh, spec=P("data"), global_shape=None) -> jax.Array:
  """A global jax.Array from this process's slice (see `local_batch_rows`) of a batch.

  Args:
    local_data: <any>[local rows, ...] host data of this process.
    mesh: the global mesh.
    spec: how the global array is sharded (default: dim 0 over 'data').
    global_shape: the global shape (default: inferred by jax from the local shapes).
  """
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_data), global_shape)


def from_host(tree, mesh, spec=P()):
  """Global jax.Arrays from host values that every process holds in full (e.g. params, seeds).

  Every leaf is laid out with `spec` (default replicated); each process copies in only the
  shards its devices hold.
  """
  sharding = NamedSharding(mesh, spec)

  def put(leaf):
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree)


def gather(tree):
  """Every leaf as a full numpy array on every process (an all-gather across processes).

  Leaves that are not jax.Arrays pass through unchanged; in a single process this is a copy to
  host.
  """
  def one(leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    if leaf.is_fully_addressable:
      return np.asarray(leaf)
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return jax.tree.map(one, tree)


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# --- lost peers ----------------------------------------------------------------------------------


class Watchdog:
  """Exits this process, naming the peer, when another process of the job stops responding.

  Each process writes an increasing counter into jax's coordination key-value store every
  `interval_s` and reads its peers' counters; a peer whose counter has not moved for `timeout_s`
  (and that has not finished cleanly) is lost. A collective with a dead peer never completes, so
  instead of waiting for it the watchdog prints which process was lost and calls `os._exit` with
  `LOST_PEER_EXIT_CODE`. If the coordinator (process 0) itself dies, the store is unreachable and
  that is reported the same way. A clean exit (atexit, or `stop(finished=True)`) marks the
  process finished so its peers do not report it.
  """

  def __init__(self, timeout_s: float, interval_s: float | None = None):
    if timeout_s <= 0:
      raise ValueError(f"watchdog timeout_s={timeout_s} must be > 0 (or do not start one).")
    self.timeout_s = float(timeout_s)
    self.interval_s = float(interval_s or min(1.0, timeout_s / 5))
    self.client = _global_state().client
    self.process_id, self.num_processes = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="moe_jax-watchdog", daemon=True)

  def start(self) -> "Watchdog":
    self._thread.start()
    atexit.register(self.stop, finished=True)
    return self

  def stop(self, finished: bool = True) -> None:
    if finished and not self._stop.is_set():
      try:
        self.client.key_value_set(f"{_KEY_PREFIX}/done/{self.process_id}", "1", True)
      except Exception:  # pylint: disable=broad-except  (the store may already be gone)
        pass
    self._stop.set()

  def _run(self):
    peers = [p for p in range(self.num_processes) if p != self.process_id]
    last_value = {p: None for p in peers}
    last_change = {p: time.monotonic() for p in peers}
    last_contact = time.monotonic()
    beat = 0
    while not self._stop.wait(self.interval_s):
      now = time.monotonic()
      try:
        beat += 1
        self.client.key_value_set(f"{_KEY_PREFIX}/beat/{self.process_id}", str(beat), True)
        values = {p: self._try_get(f"beat/{p}") for p in peers}
        finished = {p for p in peers if self._try_get(f"done/{p}") is not None}
        last_contact = now
      except Exception as e:  # pylint: disable=broad-except  (coordinator unreachable)
        if now - last_contact > self.timeout_s and not self._stop.is_set():
          self._exit(f"lost contact with the coordinator (process 0) for "
                     f"{now - last_contact:.1f} s: {str(e).splitlines()[0][:200]}")
        continue
      for p in peers:
        if values[p] != last_value[p]:
          last_value[p], last_change[p] = values[p], now
        elif p not in finished and now - last_change[p] > self.timeout_s:
          self._exit(f"process {p} of {self.num_processes} sent no heartbeat for "
                     f"{now - last_change[p]:.1f} s; it has most likely died")

  def _try_get(self, key):
    try:
      return self.client.key_value_try_get(f"{_KEY_PREFIX}/{key}")
    except Exception as e:  # pylint: disable=broad-except
      if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
        return None
      raise

  def _exit(self, why: str):
    if self._stop.is_set():
      return
    sys.stdout.flush()
    print(f"moe_jax.distributed: process {self.process_id}: {why}. Exiting with status "
          f"{LOST_PEER_EXIT_CODE} instead of waiting on collectives that cannot complete.",
          file=sys.stderr, flush=True)
    os._exit(LOST_PEER_EXIT_CODE)  # pylint: disable=protected-access
