"""Qwen/Qwen1.5-MoE-A2.7B (family `qwen2_moe`): 24 layers, hidden 2048, 60 experts of width 1408,
top-4 (raw weights), a gated shared expert of width 5632, q/k/v biases; 14.3B parameters, 2.7B
active.

  python launch/infer.py --config=configs/qwen1_5_moe_a2_7b.py \
      --config.checkpoint=/path/to/Qwen1.5-MoE-A2.7B --ids=$IDS
  python launch/convert_hf.py --src=/path/to/Qwen1.5-MoE-A2.7B --dst=/path/to/qwen1-5-moe-a2-7b-orbax \
      --format=orbax --dtype=bfloat16

`model` holds the Config fields of the released checkpoint (its config.json, with the bos / eos /
pad ids of its generation_config.json). Point config.checkpoint at the downloaded dir
(config.json + *.safetensors); its own config wins when it is loaded. moe_jax reads no
tokenizer.json: give a prompt as token ids ($IDS: comma-separated, from the model's tokenizer).
The tree is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.named("qwen1_5_moe_a2_7b")
