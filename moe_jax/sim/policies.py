"""Each policy's per-layer load estimate over a trace, and the slot tables placement makes of it.

Mirrors `moe_jax.replication.StackRunner`: `none` places no replicas; `history` uses the EMA of the
previous steps' true loads of the same layer (nothing at step 0); `pregate` / `learned` use the
recorded one-layer-ahead predictions, and the history for layer 0 (which has no predecessor);
`oracle` uses the step's own true loads, and so does `reactive` (placed from the layer's own
router: the simulator does not charge its fetch to the critical path, so its modelled time is
`oracle`'s). Placement is `moe_jax.placement.place`, vmapped. `seed` (needs recorded seed
predictions) and `eplb` (its own packing of calibration counts) are not simulated.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import placement
from moe_jax import predictor as predictor_lib

SOURCES = ("history", "hidden_state", "truth", "in_layer")     # what the simulator can replay
POLICIES = ("none",) + tuple(k for k, p in predictor_lib.PREDICTORS.items()
                             if p.source in SOURCES and not p.first)
_TABLES: dict = {}


def history_estimates(true_load: np.ndarray, decay: float) -> np.ndarray:
  """<f32>[S, L, E]: entry s is the EMA of steps 0 .. s - 1 (zeros at s = 0), by
  `predictor.history_update` (the rule the stack runner applies), per layer."""
  true_load = jnp.asarray(true_load, jnp.float32)
  update = jax.vmap(predictor_lib.history_update, in_axes=(0, 0, None))

  def step(ema, load):
    return update(ema, load, decay), ema

  _, out = jax.lax.scan(step, jnp.zeros_like(true_load[0]), true_load)
  return np.asarray(out)


def estimates(policy: str, true_load: np.ndarray, predicted: dict, *,
              decay: float = 0.8) -> np.ndarray | None:
  """<f64>[S, L, E] the load estimate each layer's placement uses, or None for `none`.

  Args:
    policy: one of POLICIES.
    true_load: <f>[S, L, E] global true loads (summed over data rows).
    predicted: kind -> <f>[S, L, E] recorded predictions (needed for pregate / learned).
    decay: history EMA decay.
  """
  if policy not in POLICIES:
    raise ValueError(f"policy {policy!r} is not one of the simulated policies {POLICIES}.")
  if policy == "none":
    return None
  source = predictor_lib.PREDICTORS[policy].source
  if source in ("truth", "in_layer"):
    return np.asarray(true_load, np.float64)
  history = np.asarray(history_estimates(true_load, decay), np.float64)
  if source == "history":
    return history
  if policy not in predicted:
    raise ValueError(f"the trace has no recorded {policy!r} predictions (it has "
                     f"{sorted(predicted)}); record them with moe_jax.bench.record.")
  out = np.asarray(predicted[policy], np.float64).copy()
  out[:, 0] = history[:, 0]            # layer 0 has no predecessor: history, as StackRunner
  return out


def sticky_tables(tables: np.ndarray, load_estimates: np.ndarray | None,
                  stickiness: float) -> np.ndarray:
  """<int32>[S, L, De, h + r] the tables resident replicas with `stickiness` would hold.

  Step by step, a layer keeps the table it held at the previous step unless the fresh one lowers
  the expected max device load (under this step's estimate) by more than `stickiness`:
  `placement.sticky_choice`, the rule `placement.place` (and so `StackRunner`) applies.
  """
  if load_estimates is None or stickiness <= 0:
    return tables
  held = np.array(tables)
  loads = np.asarray(load_estimates, np.float32)
  for s in range(1, held.shape[0]):
    held[s] = np.asarray(_sticky_layers(loads[s], held[s], held[s - 1], stickiness))
  return held


@jax.jit
def _sticky_layers(loads, tables, previous, stickiness):
  """`placement.sticky_choice` for every layer of one step: [L, E], [L, De, S] x 2 -> [L, De, S]."""
  return jax.vmap(placement.sticky_choice, in_axes=(0, 0, 0, None))(loads, tables, previous,
                                                                    stickiness)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _place_many(loads, num_devices, num_replica_slots):
  return jax.vmap(lambda load: placement.place(load, num_devices, num_replica_slots))(loads)


def slot_tables(load_estimates: np.ndarray | None, num_experts: int, num_devices: int,
                num_replica_slots: int, steps_layers: tuple[int, int]) -> np.ndarray:
  """<int32>[S, L, De, h + r] placement of every (step, layer) estimate (home tables for None)."""
  if num_experts % num_devices:
    raise ValueError(f"num_experts={num_experts} is not divisible by the expert axis "
                     f"({num_devices}); simulate an expert axis that divides it.")
  steps, layers = steps_layers
  if load_estimates is None or num_replica_slots == 0:
    home = np.asarray(placement.home_slot_table(num_experts, num_devices, num_replica_slots))
    return np.broadcast_to(home, (steps, layers) + home.shape)
  flat = np.ascontiguousarray(np.asarray(load_estimates, np.float32).reshape(-1, num_experts))
  key = (num_devices, num_replica_slots, hashlib.sha1(flat.tobytes()).hexdigest())
  if key not in _TABLES:   # placement dominates simulation time; clusters share it
    if len(_TABLES) > 256:
      _TABLES.clear()
    _TABLES[key] = np.asarray(_place_many(jnp.asarray(flat), num_devices, num_replica_slots))
  return _TABLES[key].reshape(steps, layers, num_devices, -1)
