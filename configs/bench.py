"""Benchmark presets for launch/bench.py (the main job).

  python launch/bench.py                                              # switch_tiny, all policies
  python launch/bench.py --config=configs/bench.py:model=switch_tiny,policy=learned
  python launch/bench.py --config=configs/bench.py:model=switch_base_128 \
      --config.checkpoint=/path/to/switch-base-128
  python launch/bench.py --config=configs/bench.py:model=qwen3_moe_tiny \
      --config.checkpoint=/tmp/q3tiny          # trained as configs/qwen3_moe_tiny.py says
  python launch/bench.py --config=configs/bench.py:model=qwen3_moe_tiny \
      --config.checkpoint=random               # random params of config.model: a smoke run
  python launch/bench.py --config=configs/bench.py:model=qwen3_moe_small   # shipped decoder

Decoder-only families report a prefill and a decode phase (config.bench.decode_steps greedy
steps with the KV cache after each prompt; 0: prefill only).

arg: comma-separated key=value: model (the name of a preset, `moe_jax.app.presets.named`:
switch_tiny, switch_base_E, qwen3_moe_tiny, mixtral_8x7b, ...), policy (compare only none, this
policy and oracle), mode (capacity mode: dropless | capacity). Tree described in
moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  options = dict(item.split("=", 1) for item in (arg or "").split(",") if item)
  unknown = set(options) - {"model", "policy", "mode"}
  if unknown:
    raise ValueError(f"configs/bench.py: unknown options {sorted(unknown)}; use model=, policy=, "
                     "mode=.")
  try:
    config = presets.named(options.get("model", "switch_tiny"))
  except ValueError as e:
    raise ValueError(f"configs/bench.py: model=: {e}") from None
  if "policy" in options:
    config.bench.policies = ",".join(dict.fromkeys(["none", options["policy"], "oracle"]))
  if "mode" in options:
    config.bench.capacity_modes = options["mode"]
  return config
