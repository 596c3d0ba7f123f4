"""allenai/OLMoE-1B-7B-0924: 16 layers, hidden 2048, 64 experts of width 1024, top-8 (not
renormalised), 16 heads with full-width q/k norm; 6.9B parameters, 1.3B active.

  python launch/infer.py --config=configs/olmoe_1b_7b.py \
      --config.checkpoint=/path/to/OLMoE-1B-7B-0924 --ids=$IDS
  python launch/convert_hf.py --src=/path/to/OLMoE-1B-7B-0924 --dst=/path/to/olmoe-orbax \
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
  return presets.named("olmoe_1b_7b")
