"""deepseek-ai/DeepSeek-V3 (family `deepseek_v3`): 61 layers (3 dense), hidden 7168, MLA, 256
experts of width 2048 in 8 groups (best 4 eligible), top-8, x2.5, one shared expert; 671B
parameters, 37B active.

  python launch/infer.py --config=configs/deepseek_v3.py \
      --config.checkpoint=/path/to/DeepSeek-V3 --ids=$IDS
  python launch/convert_hf.py --src=/path/to/DeepSeek-V3 --dst=/path/to/deepseek-v3-orbax \
      --format=orbax --dtype=bfloat16

`model` holds the Config fields of the released checkpoint (its config.json, with the bos / eos /
pad ids of its generation_config.json). Point config.checkpoint at the downloaded dir
(config.json + *.safetensors); its own config wins when it is loaded. moe_jax reads no
tokenizer.json: give a prompt as token ids ($IDS: comma-separated, from the model's tokenizer).
The released config.json uses yarn rope scaling (factor 40), which moe_jax does not implement:
loading that checkpoint is refused with a one-line error naming rope_type='yarn'. These shapes
serve configs, benchmarks and the simulator.
The tree is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.named("deepseek_v3")
