"""Benchmark presets for launch/bench.py (the main job).

  python launch/bench.py                                              # switch_tiny, all policies
  python launch/bench.py --config=configs/bench.py:model=switch_tiny,policy=learned
  python launch/bench.py --config=configs/bench.py:model=switch_base_128 \
      --config.checkpoint=/path/to/switch-base-128

arg: comma-separated key=value: model (switch_tiny | switch_base_E), policy (compare only none,
this policy and oracle), mode (capacity mode: dropless | capacity). Tree described in
moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  options = dict(item.split("=", 1) for item in (arg or "").split(",") if item)
  unknown = set(options) - {"model", "policy", "mode"}
  if unknown:
    raise ValueError(f"configs/bench.py: unknown options {sorted(unknown)}; use model=, policy=, "
                     "mode=.")
  model = options.get("model", "switch_tiny")
  if model == "switch_tiny":
    config = presets.switch_tiny()
  elif model.startswith("switch_base_"):
    config = presets.switch_base(int(model[len("switch_base_"):]))
  else:
    raise ValueError(f"configs/bench.py: model={model!r}; use switch_tiny or switch_base_E.")
  if "policy" in options:
    config.bench.policies = ",".join(dict.fromkeys(["none", options["policy"], "oracle"]))
  if "mode" in options:
    config.bench.capacity_modes = options["mode"]
  return config
