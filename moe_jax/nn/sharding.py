"""Logical axis names of a MoE layer's params and the rules that map them onto the mesh.

Every param axis has a logical name; a rules tuple ((logical, mesh axis or None), ...) says where
each name lives on the ('data', 'expert') mesh. The default puts the expert axis of the expert
weights on 'expert' (what `moe_apply`'s shard_map expects, so nothing moves at the call) and
keeps everything else replicated:

  router       <f32>[d, E]    ("embed", "router_exp")
  router_bias  <f32>[E]       ("router_exp",)                (sigmoid router only)
  wi, wi_gate  <f>[E, d, f]   ("exp", "embed", "mlp")        (wi_gate: silu only)
  wo           <f>[E, f, d]   ("exp", "mlp", "embed")

A user's rules may map "embed" or "mlp" elsewhere; XLA then moves the weights into the layer's
layout at the call (correct, not free). Pure functions, no Flax import.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.config import MoEConfig

DEFAULT_RULES = (("exp", "expert"), ("embed", None), ("mlp", None), ("router_exp", None))

_AXES = {
    "router": ("embed", "router_exp"),
    "router_bias": ("router_exp",),
    "wi": ("exp", "embed", "mlp"),
    "wi_gate": ("exp", "embed", "mlp"),
    "wo": ("exp", "mlp", "embed"),
}


def logical_axes(cfg: MoEConfig) -> dict:
  """name -> logical axis names of each param `init_moe_params(key, cfg)` makes."""
  names = ["router", "wi", "wo"]
  if cfg.gated:
    names.append("wi_gate")
  if cfg.router == "sigmoid":
    names.append("router_bias")
  return {name: _AXES[name] for name in names}


def mesh_spec(axes: tuple, rules, mesh=None) -> P:
  """The PartitionSpec of logical `axes` under `rules`; ValueError for a name the rules lack or
  a mesh axis `mesh` does not have."""
  table = dict(check_rules(rules, mesh))
  missing = [a for a in axes if a not in table]
  if missing:
    raise ValueError(f"sharding rules {tuple(rules)!r} have no entry for logical axes {missing}; "
                     f"add e.g. ({missing[0]!r}, None) (replicated) to the rules.")
  return P(*(table[a] for a in axes))


def check_rules(rules, mesh=None) -> tuple:
  """`rules` as a tuple of (logical name, mesh axis or None) pairs, checked."""
  try:
    pairs = tuple((str(name), target) for name, target in rules)
  except (TypeError, ValueError):
    raise ValueError(f"sharding rules must be ((logical name, mesh axis or None), ...), got "
                     f"{rules!r}; start from moe_jax.nn.DEFAULT_RULES.") from None
  allowed = None if mesh is None else set(mesh.axis_names)
  for name, target in pairs:
    targets = target if isinstance(target, tuple) else (target,)
    if allowed is not None and any(t is not None and t not in allowed for t in targets):
      raise ValueError(f"sharding rule ({name!r}, {target!r}) names a mesh axis the mesh "
                       f"{tuple(mesh.axis_names)} lacks; use one of them or None.")
  return pairs


def param_shardings(cfg: MoEConfig, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> dict:
  """name -> NamedSharding of each param on `mesh` under `rules`."""
  return {name: NamedSharding(mesh, mesh_spec(axes, rules, mesh))
          for name, axes in logical_axes(cfg).items()}
