"""mistralai/Mixtral-8x7B-v0.1: 32 layers, hidden 4096, 8 experts of width 14336, top-2,
32 query / 8 kv heads; 46.7B parameters, 12.9B active.

  python launch/infer.py --config=configs/mixtral_8x7b.py \
      --config.checkpoint=/path/to/Mixtral-8x7B-v0.1 --ids=$IDS
  python launch/convert_hf.py --src=/path/to/Mixtral-8x7B-v0.1 --dst=/path/to/mixtral-orbax \
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
  return presets.named("mixtral_8x7b")
