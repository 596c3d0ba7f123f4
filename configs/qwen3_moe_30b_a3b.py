"""Qwen/Qwen3-30B-A3B: 48 layers, hidden 2048, 128 experts of width 768, top-8 (renormalised),
32 query / 4 kv heads of 128; 30.5B parameters, 3.3B active.

  python launch/infer.py --config=configs/qwen3_moe_30b_a3b.py \
      --config.checkpoint=/path/to/Qwen3-30B-A3B --ids=$IDS
  python launch/convert_hf.py --src=/path/to/Qwen3-30B-A3B --dst=/path/to/qwen3-30b-a3b-orbax \
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
  return presets.named("qwen3_moe_30b_a3b")
